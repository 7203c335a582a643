"""HTTP input handling and response schemas shared by the Serve app (components/serve) and the edge
runtime (components/edge): request parsing and limits (``requests``), pydantic response models
(``schema``). Neither imports the other's package, so edge and serve have no import cycle."""

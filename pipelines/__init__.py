"""resops entry points: one function per DVC stage, the `resops` CLI, and job submission."""

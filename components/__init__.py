"""resops components: importable, unit-tested building blocks for every pipeline stage."""

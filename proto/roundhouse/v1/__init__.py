"""Generated Python for the `roundhouse.v1` protobuf package (see proto/generate.sh)."""

"""Generated gRPC code for package memory3.v1 (`make proto`); the .proto files are the source."""

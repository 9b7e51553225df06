"""Generate Python code (messages, stubs, .pyi) for every .proto under protos/, beside its source.

`-I protos` makes the import path equal the proto package (`memory3.v1.trainer_service_pb2`), so
the output needs no editing. Run with the pinned grpcio-tools: `make proto`.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", *protos]
    code = protoc.main(args)
    if code == 0:
        print(f"generated code for {len(protos)} proto files")
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The committed gRPC stubs are what grpcio-tools generates from proto/hybrid.proto today."""

from proto.gen_stubs import HERE, fresh_stubs


def test_stubs_are_current():
    for name, text in fresh_stubs().items():
        assert (HERE / name).read_text() == text, f"proto/{name} is stale: run python -m proto.gen_stubs"

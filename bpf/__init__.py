"""Warden's eBPF programs (BCC C sources). Nothing here but a way to find them."""
from importlib import resources

PROGRAM_PREFIX = "warden_"   # every program we attach is named so, which is how stale ones are found


def source(name: str = "warden.bpf.c") -> str:
    return resources.files(__package__).joinpath(name).read_text()

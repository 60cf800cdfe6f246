"""Every bench, one after the other (about 10 minutes on 2 cores); exit status 1 when any target is not met."""

from __future__ import annotations

import sys

from . import idle, latency, overhead, routes, scale


def main(argv: list[str] | None = None) -> int:
    """Run overhead, latency, routes, scale and idle with their defaults; list which missed a target."""
    missed = []
    for name, module in (
        ("overhead", overhead),
        ("latency", latency),
        ("routes", routes),
        ("scale", scale),
        ("idle", idle),
    ):
        print(flush=True)
        if module.main([]) != 0:
            missed.append(name)
    print()
    print(f"targets missed: {', '.join(missed)}" if missed else "every target met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

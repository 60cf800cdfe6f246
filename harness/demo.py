"""The README's first command: a three-scene demo run on the bundled CPU ComfyUI with this package."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from . import provision
from .comfy import REPO, ComfyServer, get_install, scratch_dir

STORY = REPO / "examples" / "story.json"
WORKFLOW = REPO / "examples" / "workflow_api.json"


def main(argv: list[str] | None = None) -> int:
    """Start ComfyUI with the package, run the example story through the runner, print where everything is."""
    ap = argparse.ArgumentParser(prog="scripts/dev.sh demo", description=__doc__)
    ap.add_argument(
        "--version",
        default=provision.PRIMARY,
        choices=list(provision.VERSIONS),
        help=f"ComfyUI version (default {provision.PRIMARY}: its pins are in the venv, so it needs no overlay)",
    )
    ap.add_argument("--out", type=Path, default=Path("demo-output"), help="copy the run folder here (git-ignored)")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    provision.PROGRESS = True  # name and time the steps still to do (the tree, its overlay)
    install = get_install(args.version)
    server = ComfyServer(install=install, base_dir=scratch_dir("rt-demo-"), packages={"run-telemetry": REPO})
    print(f"Starting ComfyUI {install.version} (CPU) on 127.0.0.1 …", flush=True)
    t0 = time.monotonic()
    server.start()
    print(f"  ready in {time.monotonic() - t0:.1f}s at {server.url}", flush=True)
    try:
        from telemetry.runner import run_story

        result = run_story(
            server=server.url,
            workflow=WORKFLOW,
            scenes=STORY,
            run_id=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
            out=sys.stdout,
        )
        if result.run_dir is not None:
            dest = args.out / Path(result.run_dir).name
            shutil.copytree(result.run_dir, dest, dirs_exist_ok=True)
            print(f"\nArtifact metadata: {dest / 'artifact-metadata.json'}")
            print(f"Run summary:       {dest / 'run-summary.txt'}")
        return result.exit_code
    finally:
        server.stop()
        print(f"ComfyUI stopped (its folder, with outputs and the telemetry store: {server.base_dir}).")
        print(f"Demo finished in {time.monotonic() - t_start:.0f}s (cache: {provision.cache_root()}).")


if __name__ == "__main__":
    raise SystemExit(main())

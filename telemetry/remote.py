"""Talking to a ComfyUI with this package over HTTP: ``run-telemetry wait --server`` and ``run-telemetry fetch``.

For pipelines on another machine: no shared file system, only the ``/telemetry`` routes. The client is aiohttp's
(already a dependency); :class:`Worker` is the small async wrapper the runner shares.

Exit codes of ``wait --server``: 0 the prompt succeeded, 1 it ended otherwise (error, interrupted, cancelled, lost,
crashed), 2 bad input or an unknown prompt id, 3 timed out (still queued or running, or the server did not answer).
``fetch``: 0 files written and valid, 1 written but invalid (or not finalized yet), 2 bad input or unreachable server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp

from .atomic import atomic_write
from .runs import METADATA_FILE, SUMMARY_FILE, run_id_problem

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 3

# One wait-route request holds at most this long, so a dead server is noticed between two requests.
WAIT_SLICE_SECONDS = 10.0


class ServerUnreachable(Exception):
    """The server did not answer (refused, reset, timed out); the message names the server and the reason."""


def check_server_url(url: str, *, name: str = "--server") -> str:
    """``url`` without a trailing slash; ValueError naming ``name`` when it is not an http(s) URL with a host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{name} {url!r} is not a server URL: give it as http://HOST:PORT (ComfyUI's address)")
    return url.rstrip("/")


class Worker:
    """An async JSON client of one ComfyUI server with Run Telemetry (aiohttp; one session shared by many)."""

    def __init__(self, base: str, session: aiohttp.ClientSession, *, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.session = session
        self.timeout = timeout

    async def call(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> tuple[int, Any]:
        """(HTTP status, parsed JSON or text). Raises :class:`ServerUnreachable` when no answer arrives."""
        try:
            async with self.session.request(
                method,
                self.base + path,
                json=body,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ServerUnreachable(f"{self.base} did not answer {method} {path}: {reason}") from None
        text = raw.decode("utf-8", errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    async def wait_once(self, prompt_id: str, timeout: float) -> tuple[int, Any]:
        """One wait-route request: 200 with the final record, 202 with the current state, 404 unknown."""
        quoted = urllib.parse.quote(prompt_id, safe="")
        return await self.call(
            "GET", f"/telemetry/prompts/{quoted}/wait?timeout={max(0.0, timeout):.3f}", timeout=timeout + 30
        )


def _print_json(payload: Any) -> None:
    print(json.dumps(payload), flush=True)


async def wait_http(server: str, prompt_id: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """Wait through the wait route until ``prompt_id`` ends on ``server``, at most ``timeout`` seconds.

    Returns (exit code, JSON to print): the final record (exit 0 when its Outcome is ``success``, 1 otherwise), an
    error for an unknown prompt (2), or ``{"PromptId", "Outcome", "TimedOut": true}`` with the last state seen (3).
    A server that does not answer is asked again until the deadline (it may be restarting).
    """
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {"PromptId": prompt_id, "Outcome": "unknown"}
    async with aiohttp.ClientSession() as session:
        worker = Worker(server, session)
        while True:
            left = deadline - time.monotonic()
            try:
                status, body = await worker.wait_once(prompt_id, min(max(left, 0.0), WAIT_SLICE_SECONDS))
            except ServerUnreachable as exc:
                state["Problem"] = str(exc)
                status, body = 0, None
            if status == 200 and isinstance(body, dict):
                return (EXIT_OK if body.get("Outcome") == "success" else EXIT_FAILED), body
            if status == 404:
                message = body.get("error") if isinstance(body, dict) else str(body)
                return EXIT_BAD_INPUT, {"PromptId": prompt_id, "Outcome": "unknown", "Error": message}
            if status == 202 and isinstance(body, dict):
                state = {"PromptId": prompt_id, "Outcome": body.get("Outcome", "queued")}
            elif status not in (0, 202):
                state["Problem"] = f"{server} answered HTTP {status}: {str(body)[:300]}"
            left = deadline - time.monotonic()
            if left <= 0:
                return EXIT_TIMEOUT, {**state, "TimedOut": True, "TimeoutSeconds": timeout}
            if status == 0:
                await asyncio.sleep(min(1.0, left))  # connection refused answers at once: do not spin


async def fetch_run(server: str, run_id: str, out: Path) -> tuple[int, dict[str, Any]]:
    """Download a finalized run's ``artifact-metadata.json`` and ``run-summary.txt`` into ``out`` and validate them.

    Returns (exit code, report): 0 written and valid, 1 not finalized yet or invalid; raises
    :class:`ServerUnreachable`.
    """
    from .validate import validate_run_dir

    quoted = urllib.parse.quote(run_id, safe="")
    files: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as session:
        for name in (METADATA_FILE, SUMMARY_FILE):
            url = f"{server}/telemetry/runs/{quoted}/{name}"
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=300)) as resp:
                    data = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise ServerUnreachable(f"{server} did not answer GET {url}: {exc or type(exc).__name__}") from None
            if status != 200:
                detail = data.decode("utf-8", errors="replace")[:300]
                return EXIT_FAILED, {"RunId": run_id, "Error": f"GET {url} answered HTTP {status}: {detail}"}
            files[name] = data
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write(out / name, data)
    report = validate_run_dir(out)
    body = {
        "RunId": run_id,
        "Out": str(out),
        "Files": [str(out / name) for name in files],
        "Valid": report.valid,
        "Errors": report.errors,
    }
    return (EXIT_OK if report.valid else EXIT_FAILED), body


def wait_server_command(args: argparse.Namespace) -> int:
    """``wait --server URL --prompt-id ID``: print the record (or the last state) as JSON, exit 0/1/2/3."""
    try:
        server = check_server_url(args.server)
        if not args.prompt_id:
            raise ValueError("--server needs --prompt-id: the id POST /prompt answered (or the one you chose)")
        if args.timeout < 0:
            raise ValueError(f"--timeout {args.timeout} is negative; give seconds to wait, 0 or more")
    except ValueError as exc:
        print(f"wait: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    code, body = asyncio.run(wait_http(server, args.prompt_id, args.timeout))
    if code == EXIT_BAD_INPUT:
        print(f"wait: {body.get('Error')}", file=sys.stderr, flush=True)
    _print_json(body)
    return code


def fetch_command(args: argparse.Namespace) -> int:
    """Handler for ``fetch``."""
    try:
        server = check_server_url(args.server)
        problem = run_id_problem(args.run_id, name="--run-id")
        if problem:
            raise ValueError(problem)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {args.out!r} is a file; give a folder to write the run's files into")
    except ValueError as exc:
        print(f"fetch: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    try:
        code, body = asyncio.run(fetch_run(server, args.run_id, out))
    except ServerUnreachable as exc:
        print(f"fetch: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"fetch: cannot write into --out {args.out!r}: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    if code != EXIT_OK and "Error" in body:
        print(f"fetch: {body['Error']}", file=sys.stderr, flush=True)
    _print_json(body)
    return code


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``fetch`` sub-command (``wait --server`` is an option of ``wait``, see consumer.py)."""
    fetch = subparsers.add_parser(
        "fetch",
        help="download a finalized run's artifact-metadata.json and run-summary.txt from a server",
        description=(
            "Download GET /telemetry/runs/RUN_ID/artifact-metadata.json and run-summary.txt into --out, validate "
            "them, print one JSON object. Exit 0 valid, 1 not finalized or invalid, 2 bad input or no answer."
        ),
    )
    fetch.add_argument("--server", required=True, help="ComfyUI base URL, e.g. http://gpu-1:8188")
    fetch.add_argument("--run-id", required=True, help="the run to download (finalized on that server)")
    fetch.add_argument("--out", required=True, help="folder to write the two files into (created if missing)")
    fetch.set_defaults(func=fetch_command)

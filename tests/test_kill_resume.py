"""Issue #6 R2: ``guideflow run`` killed with SIGKILL mid-run, then run again.

The real command runs as a subprocess (its own session and its own ``PREFECT_HOME``, so its
ephemeral Prefect API server is a child in the same process group) over 2,000 tiny,
distinct 32x32 PNGs listed in a CSV manifest, with the local backend, canny, shards of 100
rows, 8 requests in flight per shard and 2 shards in flight. Outputs and the ledger go to
local folders. The whole process group is SIGKILLed (flow, shard threads and the Prefect
server alike), then the same command runs again to the end.

What must hold after the second run:

* every image has exactly one canny success row across both runs and no (image,
  preprocessor, settings) key has two (:func:`connectors.ledger.duplicate_successes`);
* the second run redoes exactly the work the first run had not recorded, and leaves every
  recorded output untouched;
* "processed twice" -- an output that existed when the first run died and was written again
  by the second -- happens only for shards that had not written their ledger file, so at most
  ``shards_in_flight * shard_size`` (= 200) images;
* every output decodes to the 32x32 canny image of its input (no torn or partial object);
  the only temp files left are hidden ones the killed run was writing at the moment it died.

How "processed twice" is measured, without test-only product hooks: outputs are written to a
temp file that is ``os.replace``-d into place, so every write gives the file a new inode.
The (inode, mtime) of every output is recorded right after the kill; an output whose pair
differs after the second run was written by the second run.

The second test lands the kill *inside* a ledger write. A ``sitecustomize.py`` put on the
subprocess's ``PYTHONPATH`` (test code only; nothing in the product knows about it) swaps the
``os`` module seen by ``connectors.ledger`` for a proxy whose ``replace`` stalls on the second
ledger file: the product has written and fsynced its hidden temp file and is about to rename
it. The proxy drops a marker file, the test sees it and kills. The complete-but-unrenamed
temp file must be invisible to every reader, and the re-run must redo that shard once.

Each test starts two ``guideflow run`` processes, and each pays the ephemeral Prefect
server's start-up (seconds on an idle machine, much more on a loaded one); hence ``slow``.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from connectors.ledger import DoneIndex, duplicate_successes, read_ledger
from engine.api import Engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 2000
SIDE = 32
SHARD_SIZE = 100
CONCURRENCY = 8
IN_FLIGHT = 2
N_SHARDS = N_IMAGES // SHARD_SIZE
#: Images a SIGKILL may cost twice: the shards in flight had not written their ledger file.
REDO_BOUND = IN_FLIGHT * SHARD_SIZE
#: Scenario 1 kills once this many shard files are in the ledger and the shards in flight
#: have produced half a shard more (so the kill lands mid-shard, well before the end).
KILL_AFTER_SHARDS = 2
#: Scenario 2 stalls this ledger write (1-based): one shard file lands, the next one hangs.
STALL_WRITE = 2
RUN_TIMEOUT_S = 600  # a loaded 2-core machine starts Prefect's server slowly


# -- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """2,000 distinct tiny PNGs and the CSV manifest that lists them (id, image)."""

    manifest: Path
    ids: tuple[str, ...]
    inputs: dict[str, Path]

    def shard_of(self, image_id: str) -> int:
        """The shard a manifest row lands in (rows are in id order, SHARD_SIZE a shard)."""
        return self.ids.index(image_id) // SHARD_SIZE


def _image(i: int) -> np.ndarray:
    """A white 8x8 square at one of 576 places on a blue level from 256: 2,304 distinct."""
    rgb = np.zeros((SIDE, SIDE, 3), np.uint8)
    x, y = i % 24, (i // 24) % 24
    rgb[y : y + 8, x : x + 8] = 255
    rgb[..., 2] = (i * 7) % 256
    return rgb


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "images"
    folder.mkdir()
    ids, inputs, lines = [], {}, ["id,image"]
    for i in range(N_IMAGES):
        image_id = f"img{i:05d}"
        path = folder / f"{image_id}.png"
        Image.fromarray(_image(i)).save(path)
        ids.append(image_id)
        inputs[image_id] = path
        lines.append(f"{image_id},{path}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    assert len({p.read_bytes() for p in inputs.values()}) == N_IMAGES  # all distinct
    return Corpus(manifest=manifest, ids=tuple(ids), inputs=inputs)


@pytest.fixture(scope="module")
def expected(corpus: Corpus) -> dict[str, np.ndarray]:
    """The canny guide of every input, made in-process by the embedded engine."""
    engine = Engine()
    return {
        image_id: engine.preprocess(path.read_bytes(), "canny", {}).array
        for image_id, path in corpus.inputs.items()
    }


# -- running the command -------------------------------------------------------------------------


@dataclass
class Workspace:
    """One scenario's output prefix, ledger, Prefect home and logs."""

    root: Path

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def canny(self) -> Path:
        return self.out / "canny"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect-home"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"


@pytest.fixture()
def ws(tmp_path: Path) -> Workspace:
    space = Workspace(tmp_path)
    space.prefect_home.mkdir()
    return space


def cli_env(ws: Workspace, **extra: str) -> dict[str, str]:
    """This environment minus any Prefect setting, plus a private ``PREFECT_HOME``.

    No ``PREFECT_API_URL``: the command starts its own ephemeral server (a child process),
    whose SQLite database lives in the private home.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(ws.prefect_home),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",  # no telemetry (no network here)
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def command(corpus: Corpus, ws: Workspace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "guideflow.cli",
        "run",
        str(corpus.manifest),
        "--preprocessor",
        "canny",
        "--output",
        str(ws.out),
        "--ledger",
        str(ws.ledger),
        "--backend",
        "local",
        "--shard-size",
        str(SHARD_SIZE),
        "--concurrency",
        str(CONCURRENCY),
        "--shards-in-flight",
        str(IN_FLIGHT),
    ]


def start(corpus: Corpus, ws: Workspace, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``guideflow run`` in a new session: its process group is it and the Prefect server."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            command(corpus, ws),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_for(proc: subprocess.Popen, log: Path, ready: Any, what: str) -> float:
    """Poll every 10 ms until ``ready()``; the monotonic time it became true."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"guideflow run exited ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"no {what} after {RUN_TIMEOUT_S} s:\n{tail(log)}")
        time.sleep(0.01)
    return time.monotonic()


def _gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass
class Family:
    """The command's process and its descendants (the Prefect server), seen while alive.

    Taken before the moment to kill, so the kill itself is a single ``killpg``: after it,
    orphaned grandchildren could no longer be found through their parent.
    """

    members: list[psutil.Process]
    commands: list[str]

    @classmethod
    def of(cls, proc: subprocess.Popen) -> Family:
        leader = psutil.Process(proc.pid)
        members = [leader, *leader.children(recursive=True)]
        commands = []
        for member in members:
            try:
                commands.append(" ".join(member.cmdline()))
            except psutil.Error:
                commands.append("?")
        return cls(members, commands)

    def has_prefect_server(self) -> bool:
        return any("prefect.server.api.server:create_app" in c for c in self.commands)


def kill_group(proc: subprocess.Popen, family: Family | None = None) -> float:
    """SIGKILL the whole process group; seconds until every member is gone."""
    family = family or Family.of(proc)
    killed = time.monotonic()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = killed + 60
    while not all(_gone(m) for m in family.members) and time.monotonic() < deadline:
        time.sleep(0.005)
    latency = time.monotonic() - killed
    alive = [c for m, c in zip(family.members, family.commands, strict=True) if not _gone(m)]
    assert not alive, f"still running after SIGKILL of the process group: {alive}"
    assert proc.returncode == -signal.SIGKILL
    return latency


def start_and_watch(
    corpus: Corpus, ws: Workspace, env: dict[str, str]
) -> tuple[subprocess.Popen, Family, float]:
    """Start the first run and wait for its first output (the Prefect server is up by then)."""
    log = ws.log("run1")
    started = time.monotonic()
    proc = start(corpus, ws, log, env)
    wait_for(proc, log, lambda: count_outputs(ws) > 0, "first output")
    family = Family.of(proc)
    # The ephemeral Prefect API server is a child in the group: the kill must take it too.
    assert family.has_prefect_server(), family.commands
    return proc, family, started


def run_to_end(corpus: Corpus, ws: Workspace, name: str) -> float:
    """The same command again, without any hook, to completion; its wall time."""
    log = ws.log(name)
    started = time.monotonic()
    proc = start(corpus, ws, log, cli_env(ws))
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_group(proc)  # never leave its Prefect server behind
        pytest.fail(f"second run still going after {RUN_TIMEOUT_S} s:\n{tail(log)}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"second run exited {proc.returncode}:\n{tail(log)}"
    return elapsed


# -- looking at what is on disk -----------------------------------------------------------------


def finished_shard_files(ws: Workspace) -> list[Path]:
    """Ledger files a reader would see (hidden temp files do not match ``shard-*``)."""
    return sorted(ws.ledger.glob("date=*/run=*/shard-*.parquet"))


def count_outputs(ws: Workspace) -> int:
    """Visible outputs so far (cheap: no stat), for polling."""
    try:
        return sum(not e.name.startswith(".") for e in os.scandir(ws.canny))
    except FileNotFoundError:
        return 0


def outputs(ws: Workspace) -> dict[str, tuple[int, int]]:
    """image id → (inode, mtime ns) of every visible output."""
    if not ws.canny.is_dir():
        return {}
    found = {}
    for entry in os.scandir(ws.canny):
        if not entry.name.startswith("."):
            stat = entry.stat()
            found[entry.name] = (stat.st_ino, stat.st_mtime_ns)
    assert all(name.endswith(".png") for name in found), sorted(found)[:5]
    return {name.removesuffix(".png"): key for name, key in found.items()}


def hidden_files(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob(".*")} if folder.is_dir() else set()


@dataclass
class AtKill:
    """What the first run left behind, recorded right after it died."""

    outputs: dict[str, tuple[int, int]]
    output_temps: set[str]
    ledger: pd.DataFrame
    run_id: str
    latency_s: float
    trigger_to_signal_s: float
    run_s: float

    @property
    def recorded(self) -> set[str]:
        return set(self.ledger.loc[self.ledger["status"] == "success", "image_id"])

    @property
    def shards(self) -> set[int]:
        return set(self.ledger["shard"])


def record_kill(
    ws: Workspace, latency: float, trigger: float, signalled: float, started: float
) -> AtKill:
    frame = read_ledger(str(ws.ledger))
    runs = set(frame["run_id"])
    assert len(runs) == 1, runs
    assert 1 <= len(finished_shard_files(ws)) < N_SHARDS
    assert set(frame["status"]) == {"success"}
    return AtKill(
        outputs=outputs(ws),
        output_temps=hidden_files(ws.canny),
        ledger=frame,
        run_id=runs.pop(),
        latency_s=latency,
        trigger_to_signal_s=signalled - trigger,
        run_s=signalled - started,
    )


def check_resumed(
    corpus: Corpus, ws: Workspace, expected: dict[str, np.ndarray], at_kill: AtKill
) -> dict[str, Any]:
    """Everything R2 promises about the state after the second run; returns the numbers."""
    all_ids = set(corpus.ids)
    ledger = read_ledger(str(ws.ledger))
    success = ledger[ledger["status"] == "success"]
    assert set(ledger["status"]) == {"success"}, ledger["status"].value_counts()
    assert set(success["preprocessor"]) == {"canny"}

    # Exactly once: one success row per image across both runs, no duplicate keys.
    per_image = success.groupby("image_id").size()
    assert set(per_image.index) == all_ids
    assert (per_image == 1).all(), per_image[per_image > 1]
    assert duplicate_successes(str(ws.ledger)).empty
    second_runs = set(success["run_id"]) - {at_kill.run_id}
    assert len(second_runs) == 1
    second = success[success["run_id"] == second_runs.pop()]
    assert set(second["image_id"]) == all_ids - at_kill.recorded

    # Every success recorded by the first run had its output on disk when it died, and
    # the second run left those outputs alone; it wrote exactly the unrecorded ones.
    assert at_kill.recorded <= set(at_kill.outputs)
    final = outputs(ws)
    assert set(final) == all_ids
    rewritten = {i for i, key in final.items() if at_kill.outputs.get(i) != key}
    assert rewritten == all_ids - at_kill.recorded
    twice = rewritten & set(at_kill.outputs)

    # Only shards without a ledger file redo work, and at most the shards in flight.
    redone_shards = {corpus.shard_of(i) for i in twice}
    assert not redone_shards & at_kill.shards
    assert len(redone_shards) <= IN_FLIGHT, sorted(redone_shards)
    assert len(twice) <= REDO_BOUND

    # No partial objects: hidden temp files only from the killed run, every output exact.
    leftovers = hidden_files(ws.canny)
    assert leftovers <= at_kill.output_temps, leftovers - at_kill.output_temps
    assert all(name.endswith(".tmp") for name in leftovers), leftovers
    assert len(leftovers) <= CONCURRENCY * IN_FLIGHT
    for image_id in corpus.ids:
        data = (ws.canny / f"{image_id}.png").read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size == (SIDE, SIDE)
            rgb = np.asarray(im.convert("RGB"))
        assert np.array_equal(rgb, expected[image_id]), image_id
    return {
        "recorded_by_run1": len(at_kill.recorded),
        "run1_shard_files": len(at_kill.shards),
        "outputs_at_kill": len(at_kill.outputs),
        "processed_twice": len(twice),
        "redone_shards": sorted(redone_shards),
        "orphan_output_temps": len(leftovers),
    }


def report(title: str, at_kill: AtKill, numbers: dict[str, Any], second_s: float) -> None:
    """One line of numbers for the closing note (``pytest -s`` or ``-rP`` shows it)."""
    fields = {
        "images": N_IMAGES,
        "shards": N_SHARDS,
        "shard_size": SHARD_SIZE,
        "concurrency": CONCURRENCY,
        "in_flight": IN_FLIGHT,
        "redo_bound": REDO_BOUND,
        **numbers,
        "run1_until_kill_s": round(at_kill.run_s, 1),
        "trigger_to_signal_s": round(at_kill.trigger_to_signal_s, 3),
        "kill_latency_s": round(at_kill.latency_s, 3),
        "run2_s": round(second_s, 1),
    }
    print(f"\n[{title}] " + " ".join(f"{k}={v}" for k, v in fields.items()))


# -- scenario 1: killed mid-run, mid-shard -----------------------------------------------------


def test_sigkill_mid_run_then_rerun_does_every_image_exactly_once(
    corpus: Corpus, ws: Workspace, expected: dict[str, np.ndarray]
) -> None:
    proc, family, started = start_and_watch(corpus, ws, cli_env(ws))

    def mid_shard() -> bool:
        """Shard files are written and the shards in flight have made half a shard more."""
        files = len(finished_shard_files(ws))
        unrecorded = count_outputs(ws) - files * SHARD_SIZE
        return files >= KILL_AFTER_SHARDS and unrecorded >= SHARD_SIZE // 2

    trigger = wait_for(proc, ws.log("run1"), mid_shard, "ledger file and unrecorded outputs")
    signalled = time.monotonic()
    latency = kill_group(proc, family)
    at_kill = record_kill(ws, latency, trigger, signalled, started)
    assert len(at_kill.recorded) < N_IMAGES

    second_s = run_to_end(corpus, ws, "run2")
    numbers = check_resumed(corpus, ws, expected, at_kill)
    # The kill caught produced-but-unrecorded work (half a shard when it was decided; only a
    # shard finishing in the microseconds before the signal could have recorded it all).
    assert numbers["processed_twice"] >= 1
    report("kill between shards", at_kill, numbers, second_s)


# -- scenario 2: killed inside a ledger write ------------------------------------------------------

SITECUSTOMIZE = textwrap.dedent(
    '''
    """Test hook for tests/test_kill_resume.py, loaded only by that test's subprocess.

    When ``connectors.ledger`` is imported, its ``os`` becomes a proxy whose ``replace``
    stalls on call number $KILLTEST_STALL_WRITE: the product has written and fsynced the
    hidden temp file of a ledger shard and is about to rename it into place. The proxy then
    writes the (temp, target) paths to $KILLTEST_LEDGER_MARKER and sleeps until killed.
    """

    import importlib.abc
    import importlib.util
    import os
    import sys
    import threading
    import time

    MARKER = os.environ.get("KILLTEST_LEDGER_MARKER")
    STALL = int(os.environ.get("KILLTEST_STALL_WRITE", "2"))


    class _StallingOs:
        def __init__(self):
            self.calls = 0
            self.lock = threading.Lock()

        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, src, dst, **kw):
            with self.lock:
                self.calls += 1
                stall = self.calls == STALL
            if stall:
                with open(MARKER + ".part", "w") as fh:
                    fh.write(f"{src}\\n{dst}\\n")
                os.replace(MARKER + ".part", MARKER)
                time.sleep(3600)
            return os.replace(src, dst, **kw)


    class _PatchLedger(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "connectors.ledger":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.os = _StallingOs()

            spec.loader.exec_module = exec_module
            return spec


    if MARKER:
        sys.meta_path.insert(0, _PatchLedger())
    '''
)


def test_sigkill_during_a_ledger_write_leaves_an_ignored_temp_file(
    corpus: Corpus, ws: Workspace, expected: dict[str, np.ndarray]
) -> None:
    hook = ws.root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker = ws.root / "stalled-ledger-write"
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    env = cli_env(
        ws,
        PYTHONPATH=path,
        KILLTEST_LEDGER_MARKER=str(marker),
        KILLTEST_STALL_WRITE=str(STALL_WRITE),
    )
    proc, family, started = start_and_watch(corpus, ws, env)
    trigger = wait_for(proc, ws.log("run1"), marker.exists, "stalled ledger write")
    signalled = time.monotonic()
    latency = kill_group(proc, family)
    temp_path, target = (Path(p) for p in marker.read_text().splitlines())
    at_kill = record_kill(ws, latency, trigger, signalled, started)

    # The kill landed between the temp file and its rename: a complete parquet file sits
    # under a hidden name, and its shard is in no reader's view of the ledger.
    assert not target.exists()
    assert temp_path.name.startswith(".") and temp_path.name.endswith(".tmp")
    assert temp_path.parent == target.parent and temp_path.exists()
    stalled = pq.read_table(temp_path).to_pandas()
    stalled_shard = int(target.stem.removeprefix("shard-"))
    assert len(stalled) == SHARD_SIZE and set(stalled["shard"]) == {stalled_shard}
    assert set(stalled["status"]) == {"success"}
    assert stalled_shard not in at_kill.shards
    assert len(at_kill.shards) >= STALL_WRITE - 1
    # Plain pandas/pyarrow on the folder agree with connectors.ledger.read_ledger.
    assert len(pd.read_parquet(ws.ledger)) == len(at_kill.ledger)
    done = DoneIndex.load(str(ws.ledger))
    keys = list(stalled[["image_id", "preprocessor", "settings_hash"]].itertuples(index=False))
    assert not done.contains(keys).any()
    assert len(done) == len(at_kill.recorded)
    # Its images were produced (outputs on disk) but never recorded: they must be redone.
    assert set(stalled["image_id"]) <= set(at_kill.outputs) - at_kill.recorded

    second_s = run_to_end(corpus, ws, "run2")
    numbers = check_resumed(corpus, ws, expected, at_kill)
    assert stalled_shard in numbers["redone_shards"]
    assert numbers["processed_twice"] >= SHARD_SIZE  # the stalled shard, all of it
    # The stale temp file is still there and still ignored; the shard is recorded once.
    assert temp_path.exists()
    final = read_ledger(str(ws.ledger))
    assert (final.loc[final["shard"] == stalled_shard, "status"] == "success").sum() == SHARD_SIZE
    assert len(pd.read_parquet(ws.ledger)) == len(final) == N_IMAGES
    report("kill inside a ledger write", at_kill, numbers, second_s)

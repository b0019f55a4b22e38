"""Start stock vLLM's OpenAI server for a plan: command line, environment, process group, readiness, shutdown.

The command is assembled from layers of options, later layers winning: lvllm's defaults, the recipe, the plan,
then the user's own vLLM arguments. Every value a later layer replaces is kept as an `Override` so the CLI can say
what the user's arguments changed. vLLM runs in its own session (process group) so that stopping it stops the
engine core, the workers and anything they spawned, and nothing of it survives lvllm.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import BadInput, EngineError, StoreError, VllmUnsupported, find_plugin_error

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM flags whose values are secrets: shown masked in every printed command.
SECRET_FLAGS = frozenset({"--api-key"})
MASK = "****"
ENGINE_LIBRARY = "lvllm_runtime/_cpu"  # the compiled engine's file name stem
# The CPU backend reserves this fraction of host RAM for the KV cache; vLLM's default (0.9) would take the machine.
CPU_MEMORY_UTILIZATION = 0.2

Options = dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Override:
    """A flag set by an earlier layer (`source`) and replaced by a later one (`by`)."""

    flag: str
    old: tuple[str, ...]
    source: str
    new: tuple[str, ...]
    by: str

    def __str__(self) -> str:
        return f"{self.flag}: {_show(self.flag, self.new)} ({self.by}) replaces {_show(self.flag, self.old)} ({self.source})"


@dataclass(frozen=True)
class ServeCommand:
    """A complete vLLM server invocation. `env` holds only the variables lvllm adds to the caller's environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    host: str
    port: int
    served_model_name: str
    overrides: tuple[Override, ...] = ()

    @property
    def url(self) -> str:
        """The OpenAI base URL clients use (a wildcard bind is reached through loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    @property
    def api_key(self) -> str | None:
        """The key lvllm's own requests (readiness, demo) must send: the first `--api-key` value, else the
        VLLM_API_KEY vLLM reads from its environment."""
        args = list(self.argv)
        for i, a in enumerate(args):
            if a == "--api-key" and i + 1 < len(args):
                return args[i + 1]
            if a.startswith("--api-key="):
                return a.split("=", 1)[1]
        return self.env.get("VLLM_API_KEY") or os.environ.get("VLLM_API_KEY") or None

    def display(self) -> str:
        """The copy-pasteable command line with secrets masked."""
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(env + [shlex.join(mask_secrets(self.argv))])


def mask_secrets(argv: Sequence[str]) -> list[str]:
    """`argv` with every value of a secret flag replaced by ****."""
    out: list[str] = []
    masking = False
    for a in argv:
        flag = a.split("=", 1)[0]
        if masking and not a.startswith("-"):
            out.append(MASK)
            continue
        masking = False
        if flag in SECRET_FLAGS and "=" in a:
            out.append(f"{flag}={MASK}")
        else:
            out.append(a)
            masking = a in SECRET_FLAGS
    return out


def _show(flag: str, value: tuple[str, ...]) -> str:
    if flag in SECRET_FLAGS:
        return MASK
    return " ".join(value) if value else "(on)"


def canonical_flag(flag: str) -> str:
    """vLLM accepts `--max_model_len` and `--max-model-len`, `--x` and `--no-x` for one setting."""
    name = flag[2:].replace("_", "-")
    if name.startswith("no-"):
        name = name[3:]
    return "--" + name


def parse_vllm_args(args: Sequence[str]) -> tuple[Options, list[str]]:
    """Split vLLM arguments into {canonical flag: tokens to emit} and leftover positionals.

    The tokens keep the user's own spelling (`--no-enforce-eager`, `--api-key a b`); a flag takes every following
    token that is not itself a flag (negative numbers count as values).
    """
    opts: Options = {}
    positionals: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not _is_flag(a):
            positionals.append(a)
            i += 1
            continue
        flag, eq, value = a.partition("=")
        values: list[str] = [value] if eq else []
        i += 1
        if not eq:
            while i < len(args) and not _is_flag(args[i]):
                values.append(args[i])
                i += 1
        key = canonical_flag(flag)
        spelled = "--" + flag[2:].replace("_", "-")
        opts.pop(key, None)  # a repeated flag: the last one wins, as in argparse
        opts[key] = (spelled, *values)
    return opts, positionals


def _is_flag(token: str) -> bool:
    if not token.startswith("--") or token == "--":
        return False
    with contextlib.suppress(ValueError):
        float(token)
        return False
    return True


def option_tokens(values: Mapping[str, Any]) -> Options:
    """Options from a mapping such as a recipe's `vllm_args`: True -> bare flag, False -> `--no-flag`, None -> skipped,
    lists -> several values."""
    opts: Options = {}
    for name, v in values.items():
        flag = "--" + str(name).lstrip("-").replace("_", "-")
        key = canonical_flag(flag)
        if v is None:
            continue
        if v is True:
            opts[key] = (key,)
        elif v is False:
            opts[key] = ("--no-" + key[2:],)
        elif isinstance(v, (list, tuple)):
            opts[key] = (key, *(str(x) for x in v))
        elif isinstance(v, dict):
            opts[key] = (key, json.dumps(v, separators=(",", ":")))
        else:
            opts[key] = (key, str(v))
    return opts


def plan_options(plan: Mapping[str, Any]) -> Options:
    """The vLLM settings a plan decided (context, batch, memory fraction, KV dtype, tokens per step)."""
    v = plan.get("vllm", {})
    rt = plan.get("runtime", {})
    return option_tokens(
        {
            "max_model_len": v.get("max_model_len"),
            "max_num_seqs": v.get("max_num_seqs"),
            "gpu_memory_utilization": v.get("gpu_memory_utilization"),
            "kv_cache_dtype": v.get("kv_cache_dtype"),
            "max_num_batched_tokens": v.get("max_num_batched_tokens", rt.get("max_batch_tokens")),
            # the KV room the plan reserved; without it vLLM sizes KV from gpu_memory_utilization and can claim the
            # memory the plan gave to hot experts, staging buffers or (on the CPU backend) the expert store
            "kv_cache_memory_bytes": v.get("kv_cache_memory_bytes"),
        }
    )


def has_gpu() -> bool:
    """Whether an NVIDIA driver is visible (decides defaults and which extra to suggest; no CUDA import)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def require_vllm() -> None:
    """Raise VllmUnsupported naming the extra to install when `import vllm` cannot work here."""
    if importlib.util.find_spec("vllm") is None:
        extra = "gpu" if has_gpu() else "cpu"
        raise VllmUnsupported(
            f"vLLM is not installed in this Python ({sys.executable})",
            f"pip install 'lvllm[{extra}]'",
        )


def build_command(
    model: str | Path,
    *,
    plan_path: str | Path | None = None,
    plan: Mapping[str, Any] | None = None,
    recipe_args: Mapping[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    user_args: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    plugin_config: Mapping[str, Any] | None = None,
) -> ServeCommand:
    """Assemble the vLLM server command: lvllm defaults < recipe < plan < user arguments.

    `plan_path` reaches the plugin in every vLLM process through `--additional-config {"lvllm_plan": path}`;
    a user `--additional-config` is merged into that JSON object (user keys win), as are `plugin_config`'s keys (the
    routing recorder's). `environ` (default os.environ)
    is the environment vLLM will inherit; the command's `env` holds only what must change in it.
    """
    layers: list[tuple[str, Options]] = []
    defaults: dict[str, Any] = {
        "model": str(model),
        "served_model_name": Path(model).name,
        "host": host,
        "port": port,
    }
    if not has_gpu():
        defaults["gpu_memory_utilization"] = CPU_MEMORY_UTILIZATION
    layers.append(("lvllm", option_tokens(defaults)))
    if recipe_args:
        layers.append(("recipe", option_tokens(recipe_args)))
    if plan is not None:
        layers.append(("plan", plan_options(plan)))
    additional: dict[str, Any] = {}
    if plan_path is not None:
        additional["lvllm_plan"] = str(Path(plan_path).resolve())
    additional.update(plugin_config or {})

    user_opts, positionals = parse_vllm_args(user_args)
    if positionals:
        raise BadInput(
            f"unexpected vLLM argument(s) {' '.join(positionals)}",
            "pass vLLM options as --flag value after `--`; the model is lvllm serve's own argument",
        )
    overrides: list[Override] = []
    user_additional = user_opts.pop("--additional-config", None)
    if user_additional is not None:
        extra = _json_object(user_additional[1:] and user_additional[1])
        for k, v in extra.items():
            if k in additional and additional[k] != v:
                overrides.append(Override(f"--additional-config {k}", (str(additional[k]),), "lvllm", (str(v),), "yours"))
        additional.update(extra)
    layers.append(("yours", user_opts))

    merged: dict[str, tuple[str, tuple[str, ...]]] = {}
    for source, opts in layers:
        for key, tokens in opts.items():
            if key in merged and merged[key][1] != tokens:
                old_source, old = merged[key]
                overrides.append(Override(key, old[1:] or old, old_source, tokens[1:] or tokens, source))
            merged[key] = (source, tokens)
    if additional:
        merged["--additional-config"] = ("lvllm", ("--additional-config", json.dumps(additional)))

    argv = [sys.executable, "-m", VLLM_SERVER_MODULE]
    for _, tokens in merged.values():
        argv.extend(tokens)
    final = {k: t[1:] for k, (_, t) in merged.items()}
    try:
        final_port = int(final["--port"][0])
    except (IndexError, ValueError):
        raise BadInput(f"--port {' '.join(final['--port'])} is not a port number", "pass --port 8000") from None
    names = final.get("--served-model-name") or (str(model),)
    return ServeCommand(
        argv=tuple(argv),
        env=plugin_env(os.environ if environ is None else environ) if plan_path is not None else {},
        host=final["--host"][0] if final.get("--host") else "0.0.0.0",
        port=final_port,
        served_model_name=names[0],
        overrides=tuple(overrides),
    )


def plugin_env(environ: Mapping[str, str]) -> dict[str, str]:
    """VLLM_PLUGINS, when set, is an allow-list: without "lvllm" in it vLLM would skip the plugin and the plan."""
    allowed = environ.get("VLLM_PLUGINS")
    if allowed is None or "lvllm" in [p.strip() for p in allowed.split(",")]:
        return {}
    return {"VLLM_PLUGINS": ",".join(p for p in (allowed, "lvllm") if p)}


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "")
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise BadInput(f"--additional-config {text!r} is not a JSON object", "pass --additional-config '{\"key\": 1}'")
    return value


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` would fail now (SO_REUSEADDR as uvicorn sets it, so TIME_WAIT is not "in use")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def read_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ('' when there is none)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""


class VllmFailed(EngineError):
    """vLLM exited or never became ready; `log_tail` holds the end of its log for the CLI to show."""

    def __init__(self, message: str, fix: str, log_tail: str):
        super().__init__(message, fix)
        self.log_tail = log_tail


@dataclass
class VllmServer:
    """One running vLLM OpenAI server process group, its log file, and how to stop it."""

    command: ServeCommand
    log_path: Path
    process: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> None:
        """Check vLLM and the port, then start the server in a new session, output to `log_path`."""
        require_vllm()
        if port_in_use(self.command.host, self.command.port):
            raise BadInput(
                f"port {self.command.port} on {self.command.host} is already in use",
                "stop what is listening there or pass --port with a free port",
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.command.env}
        env.update(metrics_env(env, self.log_path.with_name(f"prometheus-{self.command.port}")))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                list(self.command.argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exited(self) -> int | None:
        """The exit code once the server process has ended, else None."""
        return None if self.process is None else self.process.poll()

    def failure(self, what: str) -> "VllmFailed":
        """`what` with the log's tail; when the plugin logged an error of its own, that error instead (its fix
        naming the log), without the tail: the plugin's line is the cause, the rest is vLLM unwinding."""
        try:
            log = self.log_path.read_text(errors="replace")
        except OSError:
            log = ""
        plugin = find_plugin_error(log)
        if plugin is not None:
            fix = f"{plugin.fix}; vLLM's log: {self.log_path}" if plugin.fix else f"see vLLM's log {self.log_path}"
            return VllmFailed(plugin.message, fix, "")
        return VllmFailed(what, f"see the vLLM log {self.log_path}", read_tail(self.log_path))

    def wait_ready(
        self,
        timeout: float | None = None,
        on_progress: Callable[[str], None] | None = None,
        poll: float = 0.5,
    ) -> float:
        """Poll GET /v1/models until it answers 200; return seconds waited.

        `on_progress` gets each new line of the vLLM log as it appears. Raises VllmFailed with the log tail when the
        process exits first or `timeout` passes.
        """
        start = time.monotonic()
        url = self.command.url + "/models"
        headers = {"Authorization": f"Bearer {self.command.api_key}"} if self.command.api_key else {}
        offset = 0
        while True:
            rc = self.exited()
            if rc is not None:
                raise self.failure(f"vLLM exited with code {rc} before it was ready")
            if _http_ok(url, headers):
                return time.monotonic() - start
            if timeout is not None and time.monotonic() - start > timeout:
                raise self.failure(f"vLLM was not ready after {timeout:.0f} s")
            if on_progress is not None:
                offset = _new_lines(self.log_path, offset, on_progress)
            time.sleep(poll)

    def engine_pids(self, store: Path) -> list[int]:
        """Server processes that run lvllm's CPU engine on `store`: both the engine library and the store's layer
        files are mapped there (stock vLLM maps neither), the outside proof that the plugin took over."""
        import psutil

        if self.process is None:
            return []
        root = str(Path(store).resolve()) + os.sep
        pids = []
        for p in _descendants(self.process.pid):
            with contextlib.suppress(psutil.Error):
                paths = {m.path for m in p.memory_maps()}
                if any(ENGINE_LIBRARY in x for x in paths) and any(x.startswith(root) for x in paths):
                    pids.append(p.pid)
        return pids

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group, wait up to `timeout`, then SIGKILL every survivor.

        Descendants are collected before signalling, so processes that left the group or were re-parented are
        still found."""
        if self.process is None:
            return
        pid = self.process.pid
        family = _descendants(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None and not _alive(family + _group(pid)):
                return
            time.sleep(0.2)
        for p in _alive(family + _group(pid)):
            with contextlib.suppress(Exception):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


def metrics_env(environ: Mapping[str, str], fresh: Path) -> dict[str, str]:
    """PROMETHEUS_MULTIPROC_DIR for one server start, `fresh` emptied (an earlier server's files would add up):
    vLLM's /metrics then collects the series of every process, the plugin's `lvllm_` ones from the engine's process
    included (metrics.py). A directory the user set is theirs to manage."""
    if "PROMETHEUS_MULTIPROC_DIR" in environ:
        return {}
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    return {"PROMETHEUS_MULTIPROC_DIR": str(fresh)}


def check_record_path(path: Path) -> Path:
    """Where `--record-routing` writes its profile: a file in an existing, writable directory (checked before vLLM
    starts; the plugin writes it atomically)."""
    path = path.expanduser().resolve()
    if path.is_dir():
        raise BadInput(f"--record-routing {path} is a directory", "pass a file name, e.g. --record-routing routing.json")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise BadInput(f"--record-routing {path}: {path.parent} is not a writable directory",
                       "pass a file in a directory that exists and you can write")
    return path


def _new_lines(path: Path, offset: int, each: Callable[[str], None]) -> int:
    """Call `each` for every complete line of `path` after byte `offset`; return the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        if line.strip():
            each(line.strip())
    return offset + end


def _http_ok(url: str, headers: Mapping[str, str]) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=dict(headers)), timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _descendants(pid: int) -> list:
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def _alive(procs: list) -> list:
    import psutil

    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _group(pgid: int) -> list:
    """Every process in process group `pgid`."""
    import psutil

    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid:
                out.append(p)
    return out


# ---- from a model directory to a ServeCommand ---------------------------------------------------------------------
@dataclass(frozen=True)
class ServeSetup:
    """What `lvllm serve` decided before starting vLLM."""

    command: ServeCommand
    plan: dict
    plan_path: Path
    store: Path
    log_path: Path
    plan_made: bool
    store_check: str  # what was checked of the store's files against its manifest, and how long it took


def config_sha(model: Path) -> str:
    from .store import config_sha256

    return config_sha256(model / "config.json")


def model_key(model: Path) -> str:
    """A directory name for one model: its folder name plus a short hash of its config."""
    return f"{model.name}-{config_sha(model)[:10]}"


def default_store_dir(model: Path) -> Path:
    """Where `lvllm serve` looks for a model's expert store when --store is not given (and --quantize writes it)."""
    from . import envs

    return envs.cache_dir() / "stores" / model_key(model)


def run_dir(model: Path) -> Path:
    """Where `lvllm serve` keeps the plan it made and vLLM's log."""
    from . import envs

    return envs.cache_dir() / "serve" / model_key(model)


def quantize_command(model: Path, store: Path) -> str:
    return shlex.join(["lvllm", "quantize", str(model), str(store)])


def make_store(model: Path, store: Path, on_progress: Callable[[str], None] | None = None) -> None:
    """Quantize `model`'s routed experts into `store` (INT4, one slice per NUMA node of this machine)."""
    from .quantize import Progress, QuantizeOptions, quantize

    def progress(p: Progress) -> None:
        if on_progress is not None:
            on_progress(f"{p.stage} layer {p.layers_done}/{p.layers_total}, {p.bytes_written / 1e6:.1f} MB written")

    # resume: an interrupted earlier run leaves an unfinished store that is checked and completed, not refused
    result = quantize(model, store, QuantizeOptions(numa_nodes="auto", resume=True), progress)
    if not result.passed:
        raise StoreError(f"the new expert store {store} failed verification (max error {result.max_rel_error:.3g})",
                         f"inspect it with `lvllm quantize {model} {store} --verify`")


def store_complete(store: Path) -> bool:
    from .store import read_manifest

    manifest = read_manifest(store)
    return manifest is not None and manifest.complete


def check_model_dir(model: Path) -> Path:
    if not (model / "config.json").is_file():
        raise BadInput(f"{model} is not a model directory (no config.json)", "pass the directory of a Hugging Face checkpoint")
    return model.resolve()


def check_store(model: Path, store: Path):
    """The store's manifest; StoreError unless `store` is a complete expert store made from this model's config."""
    from .store import ExpertStore

    if not (store / "lvllm.json").is_file():
        raise StoreError(
            f"no expert store at {store}",
            f"make it with `{quantize_command(model, store)}` (or add --quantize)",
        )
    manifest = ExpertStore.open(store).manifest
    if manifest.config_sha256 != config_sha(model):
        raise StoreError(
            f"expert store {store} was made from another model ({manifest.source_path}, {manifest.model_type})",
            f"pass the store of {model.name} or make one with `{quantize_command(model, store.with_name(model.name + '-store'))}`",
        )
    check_engine_shape(model, store, manifest)
    return manifest


def check_engine_shape(model: Path, store: Path, manifest) -> None:
    """StoreError when the CPU engine would refuse the store's expert shape (a store an older lvllm wrote): said
    here, before vLLM starts, not inside it."""
    from .manifest import ENGINE_ALIGN, engine_runs

    h, i, nodes = manifest.hidden_size, manifest.intermediate_size, manifest.numa_nodes
    if engine_runs(h, manifest.node_intermediate_size):
        return
    runs = engine_runs(h, i)
    raise StoreError(
        f"expert store {store} splits experts of hidden size {h}, intermediate size {i} over {nodes} node(s) "
        f"({manifest.node_intermediate_size} per node); the CPU engine runs multiples of {ENGINE_ALIGN}",
        f"make a store it runs: `{quantize_command(model, store.with_name(store.name + '-1node'))} --numa-nodes 1`"
        if runs else "lvllm's CPU engine cannot run this model's experts",
    )


def verified_stamp(store: Path) -> Path:
    """The file whose mtime says when the sha256 of `store`'s files last matched its manifest (kept in the cache:
    a store may be read-only)."""
    from . import envs

    key = hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:16]
    return envs.cache_dir() / "verified" / f"{key}.json"


def check_store_files(store: Path, manifest, verify: bool) -> str:
    """Check every layer file's size against the manifest, and its sha256 too with `verify` or when the manifest is
    newer than the last verified stamp; StoreError at the first mismatch. Returns what was checked, timed."""
    from .atomic import write_json
    from .store import MANIFEST, check_files, format_bytes

    stamp = verified_stamp(store)
    hashes = verify or not stamp.is_file() or (store / MANIFEST).stat().st_mtime_ns > stamp.stat().st_mtime_ns
    t0 = time.monotonic()
    hashed = check_files(store, manifest, hashes)
    seconds = time.monotonic() - t0
    files = len(manifest.files)
    if not hashes:
        return f"sizes of {files} files checked (sha256 matched on an earlier start; --verify-store checks again)"
    write_json(stamp, {"store": str(store.resolve()), "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return f"sha256 of {files} files ({format_bytes(hashed)}) checked in {seconds:.2f} s"


def check_plan(plan: Mapping[str, Any], plan_path: Path, model: Path, store: Path | None) -> None:
    """BadInput when a given plan was made for another model or store, or needs a GPU this machine lacks."""
    sha = plan.get("model", {}).get("config_sha256")
    if sha and sha != config_sha(model):
        raise BadInput(f"plan {plan_path} was made for another model ({plan['model'].get('path')})",
                       "drop --plan to make one for this model, or pass its own plan")
    planned_store = plan.get("store", {}).get("path")
    if store is not None and planned_store and Path(planned_store).resolve() != store.resolve():
        raise BadInput(f"plan {plan_path} uses the store {planned_store}, not {store}",
                       "drop --plan to make a new plan for this store, or drop --store")
    context, longest = plan.get("vllm", {}).get("max_model_len"), max_position_embeddings(model)
    if isinstance(context, int) and longest and context > longest:  # vLLM would refuse it with its traceback
        raise BadInput(f"plan {plan_path} sets max_model_len {context}, above the model's max_position_embeddings "
                       f"{longest}", f"re-plan with `lvllm plan {model} --max-model-len {longest}`, or drop --plan")
    gpus = plan.get("hardware", {}).get("gpus") or plan.get("memory", {}).get("gpus")
    if gpus and not has_gpu():
        raise BadInput(f"plan {plan_path} places weights on {len(gpus)} GPU(s) and this machine has none",
                       "drop --plan to make a plan for this machine")


def recipe_vllm_args(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The vLLM flags a recipe sets directly (context and batch reach vLLM through the plan, which reads them)."""
    serving = recipe.get("serving") or {}
    args: dict[str, Any] = {"served_model_name": recipe.get("served_name")}
    if serving.get("tool_call_parser"):
        args["enable_auto_tool_choice"] = True
        args["tool_call_parser"] = serving["tool_call_parser"]
    args["reasoning_parser"] = serving.get("reasoning_parser")
    args["enforce_eager"] = serving.get("enforce_eager")
    args.update(serving.get("vllm_args") or {})
    return args


def prepare(
    model: str | Path,
    *,
    recipe: Mapping[str, Any] | None = None,
    store: str | Path | None = None,
    plan_path: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    user_args: Sequence[str] = (),
    quantize: bool = False,
    verify_store: bool = False,
    on_stage: Callable[[str, str], None] | None = None,
    record_routing: Path | None = None,
    record_every_s: float | None = None,
) -> ServeSetup:
    """Find (or with `quantize`, make) the expert store, load or make the plan, and assemble the vLLM command.

    `on_stage(stage, detail)` is told when "store" and "plan" start. Nothing is started; the plan made here is
    written to `run_dir(model)/plan.json` so that the printed command works on its own. `record_routing`: the file
    the plugin keeps the routed picks in (every `record_every_s` seconds), the profile `lvllm plan` reads.
    """
    stage = on_stage or (lambda name, detail: None)
    model = check_model_dir(Path(model))
    recorder: dict[str, Any] = {}
    if record_routing is not None:
        recorder["lvllm_record_routing"] = str(check_record_path(Path(record_routing)))
    if record_every_s is not None:
        if not record_every_s > 0:
            raise BadInput(f"--record-every {record_every_s} is not a positive number of seconds",
                           "pass e.g. --record-every 10")
        recorder["lvllm_record_every_s"] = float(record_every_s)
    if recipe is not None:
        want = (recipe.get("architecture") or {}).get("model_type")
        have = json.loads((model / "config.json").read_text()).get("model_type")
        if want and have and want != have:
            raise BadInput(f"recipe {recipe.get('name')} is for {want} models and {model.name} is {have}",
                           "pick a recipe for this architecture (`lvllm recipes`) or drop --recipe")
    plan: dict[str, Any] | None = None
    if plan_path is not None:
        from .plan import load_plan

        plan_path = Path(plan_path).resolve()
        plan = load_plan(plan_path)
        check_plan(plan, plan_path, model, Path(store) if store else None)
    chosen = Path(store) if store else Path(plan["store"]["path"]) if plan and plan["store"].get("path") else default_store_dir(model)
    stage("store", str(chosen))
    if quantize and not store_complete(chosen):
        make_store(model, chosen, lambda detail: stage("store", detail))
    manifest = check_store(model, chosen)
    chosen = chosen.resolve()
    stage("store", "checking the store's files against its manifest")
    store_check = check_store_files(chosen, manifest, verify_store)
    stage("store", store_check)

    made = plan is None
    if plan is None:
        stage("plan", "planning for this machine")
        plan, plan_path = make_serve_plan(model, chosen, recipe)
    else:
        plan, plan_path = fit_plan_to_store(plan, Path(plan_path), chosen, manifest, model)
    assert plan_path is not None
    if not plan.get("fits", True):
        from .errors import DoesNotFit

        reason = (plan.get("reasons") or [{"why": "the plan does not fit", "fix": "see `lvllm plan`"}])[0]
        raise DoesNotFit(reason["why"], reason["fix"])
    command = build_command(
        model,
        plan_path=plan_path,
        plan=plan,
        recipe_args=recipe_vllm_args(recipe) if recipe else None,
        host=host,
        port=port,
        user_args=user_args,
        plugin_config=recorder,
    )
    log_path = run_dir(model) / f"vllm-{command.port}.log"
    return ServeSetup(command, plan, Path(plan_path), chosen, log_path, made, store_check)


def fit_plan_to_store(plan: dict, plan_path: Path, store: Path, manifest, model: Path) -> tuple[dict, Path]:
    """A given plan must describe the store it will run on. A plan made before the store existed (no path) gets the
    path filled in, saved as a copy under run_dir(model); one made for another format or node split is refused."""
    planned = plan.get("store", {})
    want = (planned.get("weight_format"), planned.get("group_size"), planned.get("numa_nodes"))
    have = (manifest.weight_format, manifest.group_size, manifest.numa_nodes)
    if want != have:
        raise BadInput(
            f"plan {plan_path} expects a {want[0]} store (group {want[1]}, {want[2]} node slices); {store} is {have[0]} "
            f"(group {have[1]}, {have[2]} node slices)",
            "drop --plan to plan for this store, or re-plan with `lvllm plan MODEL --store STORE`",
        )
    if planned.get("path"):
        return plan, plan_path
    from .plan import save_plan

    plan = {**plan, "store": {**planned, "path": str(store), "exists": True}}
    path = run_dir(model) / "plan.json"
    save_plan(plan, path)
    return plan, path


def make_serve_plan(model: Path, store: Path, recipe: Mapping[str, Any] | None) -> tuple[dict, Path]:
    """Plan `model` with `store` on this machine (probed now) and save it under run_dir(model)."""
    import dataclasses

    from . import planner, topology
    from .plan import save_plan

    source = planner.load_model(model)
    if recipe is not None:
        source = dataclasses.replace(source, recipe=dict(recipe))
    options = planner.PlanOptions(store=str(store))
    if not has_gpu():
        options = dataclasses.replace(options, gpu_memory_utilization=CPU_MEMORY_UTILIZATION)
    topo = topology.probe()
    plan = planner.make_plan(source, topo, options)
    longest = max_position_embeddings(model)
    if longest and plan["vllm"]["max_model_len"] > longest:  # vLLM refuses a context beyond the model's positions
        plan = planner.make_plan(source, topo, dataclasses.replace(options, max_model_len=longest))
    path = run_dir(model) / "plan.json"
    if plan.get("fits", True):
        save_plan(plan, path)
    return plan, path


def max_position_embeddings(model: Path) -> int | None:
    """The longest context the checkpoint's config allows (text config of multimodal models), if it says."""
    config = json.loads((model / "config.json").read_text())
    value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(value) if value else None

"""Replay golden vectors (`*_golden.json`, ALGORITHMS.md §4) through the real step loop.

For every case: build the reference call's canvas (one `Sequence` per prompt row, so a batched case
runs as one batched forward like the reference's `(B, L)` input), pick the policy from the case's
`reference` + `kwargs` through the registry, run `engine.step.run_to_completion`, and compare the
output canvas, the NFE, every forward's input (and, on cache paths, which window was recomputed
against which cached keys), and optionally every forward's logits.

Nothing here knows case names: any set produced the same way (other shapes, ids, prompt lengths,
batches, models) replays. Two seams exist for isolating failures:

* `RecordingModel` wraps the model and records each forward without changing it (the step loop
  cannot tell the difference);
* `LogitsReplayModel` replaces the model by the stored per-forward logits, which tests the decoder
  logic alone (`--decoder-only`), and `ReplayRandomSource` replaces the RNG by the stored draws
  (`--rng replay`) when a seeded generator cannot reproduce the reference's stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dllm_runtime.decoding.base import RandomSource, Sequence
from dllm_runtime.decoding.registry import policy_from_reference
from dllm_runtime.engine.step import run_to_completion
from dllm_runtime.models.base import SpecialIds, select_logits

GOLDEN_SUFFIX = "_golden.json"
TENSORS_SUFFIX = "_golden_tensors.safetensors"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------- golden files
@dataclass
class GoldenFile:
    """One `*_golden.json` and its (lazily loaded) tensors file."""

    path: Path
    doc: dict[str, Any]
    _tensors: dict[str, torch.Tensor] | None = None

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def cases(self) -> list[dict[str, Any]]:
        return list(self.doc.get("cases", []))

    @property
    def tensors_path(self) -> Path:
        return self.path.with_name(self.path.name[: -len(GOLDEN_SUFFIX)] + TENSORS_SUFFIX)

    def has_tensors(self) -> bool:
        return self.tensors_path.is_file()

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            from safetensors.torch import load_file

            if not self.has_tensors():
                raise FileNotFoundError(f"{self.tensors_path}: needed for stored logits / RNG draws")
            self._tensors = load_file(str(self.tensors_path))
        return self._tensors


def load_golden_dir(directory: str | Path) -> list[GoldenFile]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    files = sorted(directory.glob(f"*{GOLDEN_SUFFIX}"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *{GOLDEN_SUFFIX} files")
    return [GoldenFile(p, json.loads(p.read_text())) for p in files]


def model_paths(golden: GoldenFile, model_name: str) -> tuple[Path, Path]:
    """`DIR/<model>_config.json` and `DIR/<model>.safetensors`."""
    return golden.directory / f"{model_name}_config.json", golden.directory / f"{model_name}.safetensors"


def case_special_ids(case: dict[str, Any], golden: GoldenFile) -> SpecialIds:
    """Special ids from the case, else the file, else the model config (`_golden_note`, then HF keys)."""
    raw = case.get("special_ids") or golden.doc.get("special_ids")
    if not raw:
        config_path, _ = model_paths(golden, case["model"])
        config = json.loads(config_path.read_text())
        raw = dict(config.get("_golden_note") or {})
        for name, key in (
            ("mask", "mask_token_id"),
            ("eos", "eos_token_id"),
            ("pad", "pad_token_id"),
            ("bos", "bos_token_id"),
        ):
            if name not in raw and config.get(key) is not None:
                raw[name] = config[key]
    missing = [k for k in ("mask", "eos") if raw.get(k) is None]
    if missing:
        raise ValueError(f"special ids: {missing[0]!r} not found in the case, the golden file or the model config")
    eot = raw.get("eot", raw.get("im_end"))
    return SpecialIds(
        mask=int(raw["mask"]),
        eos=int(raw["eos"]),
        pad=int(raw.get("pad", raw["eos"])),
        eot=None if eot is None else int(eot),
        bos=None if raw.get("bos") is None else int(raw["bos"]),
    )


# ---------------------------------------------------------------------------- model seams
@dataclass
class ForwardRecord:
    """What one batched forward received: rows (unpadded), and per row the canvas window."""

    rows: list[torch.Tensor]
    #: per row (offset, use_cache, store_cache, canvas_length); None for full non-cache forwards
    windows: list[tuple[int, bool, bool, int]] | None
    logits: torch.Tensor | None
    #: (N, T) bool, False = left pad (None: no padding); pad queries' logits are never read
    valid: torch.Tensor | None = None
    #: reference row j is our row order[j] (set by the trace comparison)
    order: list[int] | None = None


class RecordingModel:
    """Transparent model wrapper recording every forward (the instrumentation hook).

    The step loop only calls the model and reads attributes, so a wrapper is enough: it returns the
    wrapped model's logits unchanged.
    """

    def __init__(self, model: Any, keep_logits: bool = True) -> None:
        self.model = model
        self.keep_logits = keep_logits
        self.records: list[ForwardRecord] = []

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (e.g. copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Any = None, logits_index: Any = None
    ) -> torch.Tensor:
        logits = self.model(input_ids, positions, attention)  # every position: the trace compares them all
        cache_rows = getattr(attention, "rows", None)
        if cache_rows is not None:  # BatchedCacheAttention: rows carry their ForwardSpec
            lengths = [r.length for r in cache_rows]
            windows = [(r.spec.offset, r.spec.use_cache, r.spec.store_cache, r.seq.length) for r in cache_rows]
        else:
            lengths = [input_ids.shape[1]] * input_ids.shape[0]
            windows = None
        rows = [input_ids[i, :n].detach().cpu().clone() for i, n in enumerate(lengths)]
        kept = logits.detach().float().cpu().clone() if self.keep_logits else None
        valid = getattr(attention, "new_valid", getattr(attention, "key_valid", None))
        valid = None if valid is None else valid.detach().cpu().clone()
        self.records.append(ForwardRecord(rows, windows, kept, valid))
        return select_logits(logits, logits_index)


class LogitsReplayModel:
    """Stands in for a model: the i-th forward returns the i-th stored logits.

    Drives a decoder with the reference's own logits (ALGORITHMS.md §4.5 step 2), which isolates the
    decoder's logic from model numerics. Cache contexts are never consulted (no attention runs).
    """

    def __init__(
        self, logits: list[torch.Tensor], special_ids: SpecialIds, num_layers: int = 1, shift_logits: bool = False
    ) -> None:
        self.logits = logits
        self.special_ids = special_ids
        self.num_layers = num_layers
        self.shift_logits = shift_logits
        self.calls = 0

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Any = None, logits_index: Any = None
    ) -> torch.Tensor:
        if self.calls >= len(self.logits):
            raise RuntimeError(f"decoder ran forward {self.calls + 1} but the reference made only {len(self.logits)}")
        out = self.logits[self.calls]
        self.calls += 1
        if tuple(out.shape[:2]) != tuple(input_ids.shape):
            raise RuntimeError(
                f"forward {self.calls}: input {tuple(input_ids.shape)}, "
                f"but the reference's logits are {tuple(out.shape)}"
            )
        return select_logits(out.to(input_ids.device), logits_index)


# ---------------------------------------------------------------------------- RNG seams
class ReplayRandomSource(RandomSource):
    """Returns the reference's stored draws in order, checking each call's kind, shape and dtype."""

    def __init__(self, draws: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(seed=0)
        self.draws = draws
        self.tensors = tensors
        self.index = 0

    def _next(self, kinds: tuple[str, ...]) -> tuple[dict[str, Any], torch.Tensor]:
        if self.index >= len(self.draws):
            raise RuntimeError(
                f"decoder made draw {self.index + 1} ({kinds[0]}) but the reference made {len(self.draws)}"
            )
        entry = self.draws[self.index]
        self.index += 1
        if entry["fn"] not in kinds:
            raise RuntimeError(f"draw {self.index}: decoder called {kinds[0]} but the reference called {entry['fn']}")
        key = entry.get("key")
        if key is None or key not in self.tensors:
            raise RuntimeError(f"draw {self.index} ({entry['fn']}): its tensor was not stored")
        return entry, self.tensors[key]

    def rand(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        entry, value = self._next(("rand_like", "rand"))
        if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
            raise RuntimeError(
                f"draw {self.index}: decoder drew {tuple(shape)} {dtype}, reference {tuple(value.shape)} {value.dtype}"
            )
        return value.to(device)

    def multinomial(self, probs: torch.Tensor, num_samples: int, replacement: bool = False) -> torch.Tensor:
        _, value = self._next(("multinomial",))
        return value.to(probs.device)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        # Categorical.sample records its internal multinomial first: skip it, use the sampled ids
        if self.index < len(self.draws) and self.draws[self.index]["fn"] == "multinomial":
            nxt = self.index + 1
            if nxt < len(self.draws) and self.draws[nxt]["fn"] == "categorical_sample":
                self.index = nxt
        _, value = self._next(("categorical_sample",))
        return value.to(probs.device).reshape(probs.shape[:-1])


class CpuStreamRandomSource(RandomSource):
    """`torch.manual_seed(seed)` on CPU, draws moved to the model's device.

    The golden references ran on CPU; a CUDA generator with the same seed gives a different stream,
    so conformance on a GPU keeps the CPU stream and only moves the values.
    """

    def __init__(self, seed: int | None) -> None:
        super().__init__(seed)
        #: (kind, shape, dtype) of every call, to explain a failing sampling case (`draw_mismatch`)
        self.calls: list[tuple[str, tuple[int, ...] | None, torch.dtype | None]] = []

    def rand(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        self.calls.append(("rand", tuple(shape), dtype))
        return torch.rand(shape, dtype=dtype, generator=self.generator).to(device)

    def multinomial(self, probs: torch.Tensor, num_samples: int, replacement: bool = False) -> torch.Tensor:
        self.calls.append(("multinomial", None, None))
        return super().multinomial(probs.cpu(), num_samples, replacement).to(probs.device)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        self.calls.append(("categorical", None, None))
        return super().categorical(probs.cpu()).to(probs.device)


def draw_mismatch(calls: list[tuple[str, tuple[int, ...] | None, torch.dtype | None]], draws: list[dict]) -> str | None:
    """First difference between the decoder's RNG calls and the reference's recorded `rng_draws`.

    Only a diagnostic for failing cases: the kinds must agree in order (a recorded `multinomial`
    followed by its `categorical_sample` is one `Categorical.sample`), and uniform draws must agree in
    shape and dtype, because each one advances the generator by its size.
    """
    expected: list[tuple[str, tuple[int, ...] | None, str | None]] = []
    for entry in draws:
        fn = entry["fn"]
        if fn == "categorical_sample":
            if expected and expected[-1][0] == "multinomial":
                expected.pop()
            expected.append(("categorical", None, None))
        elif fn in ("rand", "rand_like"):
            expected.append(("rand", tuple(entry["shape"]), str(entry["dtype"])))
        else:
            expected.append((fn, None, None))
    for i, (got, want) in enumerate(zip(calls, expected)):
        kind, shape, dtype = got
        if kind != want[0] or (kind == "rand" and (shape != want[1] or str(dtype).replace("torch.", "") != want[2])):
            mine = " ".join(str(v) for v in (kind, shape, dtype) if v is not None)
            theirs = " ".join(str(v) for v in want if v is not None)
            return f"draw {i + 1}: decoder {mine}, reference {theirs}"
    if len(calls) != len(expected):
        return f"decoder made {len(calls)} random draws, the reference {len(expected)}"
    return None


class _SharedDraws:
    def __init__(self, source: RandomSource, rows: int) -> None:
        self.source = source
        self.rows = rows
        self.draws: list[torch.Tensor] = []


class RowRandomSource(RandomSource):
    """Row `row` of a batched reference call, whose every draw covers all `B` rows at once.

    The first row asking for its n-th draw makes the full `(B, ...)` draw; every row gets its slice.
    Valid while the rows step in lockstep, which is what a batched reference call does.
    """

    def __init__(self, shared: _SharedDraws, row: int) -> None:
        self.generator = shared.source.generator
        self.shared = shared
        self.row = row
        self.calls = 0

    def rand(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if not shape or shape[0] != 1:
            raise RuntimeError(f"batched replay expects per-row draws of shape (1, ...), got {tuple(shape)}")
        i, self.calls = self.calls, self.calls + 1
        if i == len(self.shared.draws):
            self.shared.draws.append(self.shared.source.rand((self.shared.rows, *shape[1:]), dtype, device))
        value = self.shared.draws[i]
        if tuple(value.shape[1:]) != tuple(shape[1:]) or value.dtype != dtype:
            raise RuntimeError(f"row {self.row} draw {i + 1}: rows drew different shapes (not in lockstep)")
        return value[self.row : self.row + 1]

    def multinomial(self, probs: torch.Tensor, num_samples: int, replacement: bool = False) -> torch.Tensor:
        raise RuntimeError("per-row multinomial draws of a batched reference call cannot be reproduced")

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("per-row categorical draws of a batched reference call cannot be reproduced")


# ---------------------------------------------------------------------------- running a case
@dataclass
class ConformanceOptions:
    device: str = "cpu"
    #: "seed": torch.manual_seed-equivalent generator; "replay": the stored draws
    rng: str = "seed"
    #: drive the decoder with stored logits instead of the model
    decoder_only: bool = False
    #: compare every forward's logits with the stored ones (when stored), `torch.allclose`-style:
    #: |got - want| <= atol + rtol * |want| (fp32 kernels differ in summation order); None = skip
    logits_atol: float | None = 1e-4
    logits_rtol: float = 1e-5


@dataclass
class CaseResult:
    file: str
    name: str
    passed: bool
    nfe: int | None = None
    forwards: int = 0
    logits_max_diff: float | None = None
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None

    def line(self) -> str:
        if self.skipped:
            return f"SKIP {self.name}: {self.skipped}"
        detail = f"nfe {self.nfe}, {self.forwards} forwards"
        if self.logits_max_diff is not None:
            detail += f", logits max|diff| {self.logits_max_diff:.1e}"
        if self.passed:
            return f"PASS {self.name} ({detail})"
        return f"FAIL {self.name} ({detail}): " + "; ".join(self.problems[:4])


ModelProvider = Callable[[GoldenFile, dict[str, Any], SpecialIds], Any]


def default_model_provider(options: ConformanceOptions) -> ModelProvider:
    """Loads `DIR/<model>` with the models package, once per (file dir, model name)."""
    loaded: dict[tuple[str, str], Any] = {}

    def provide(golden: GoldenFile, case: dict[str, Any], special: SpecialIds) -> Any:
        key = (str(golden.directory), case["model"])
        if key not in loaded:
            from dllm_runtime.models import load_model_files

            config_path, weights = model_paths(golden, case["model"])
            dtype = _DTYPES.get(str(golden.doc.get("env", {}).get("dtype", "float32")), torch.float32)
            loaded[key] = load_model_files(
                config_path, [weights], dtype=dtype, device=options.device, special_ids=special
            )
        return loaded[key]

    return provide


def replay_model_provider(golden: GoldenFile, case: dict[str, Any], special: SpecialIds) -> Any:
    """Decoder-in-isolation: a `LogitsReplayModel` over the case's stored per-forward logits."""
    tensors = golden.tensors()
    keys = [t.get("logits_key") for t in case["trace"]]
    if any(k is None or k not in tensors for k in keys):
        raise LookupError("no stored per-forward logits for this case")
    config_path, _ = model_paths(golden, case["model"])
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    shift = str(config.get("model_type", "")).lower() == "dream"
    return LogitsReplayModel([tensors[k] for k in keys], special, shift_logits=shift)


def run_case(
    golden: GoldenFile, case: dict[str, Any], options: ConformanceOptions, provide_model: ModelProvider
) -> CaseResult:
    name = case.get("name", "?")
    result = CaseResult(file=golden.path.name, name=name, passed=False)
    special = case_special_ids(case, golden)
    decoder = policy_from_reference(case["reference"], case.get("kwargs", {}), special)
    try:
        base_model = provide_model(golden, case, special)
    except LookupError as exc:
        result.skipped = str(exc)
        return result
    device = torch.device(options.device)
    seqs, source = _build_sequences(golden, case, decoder.gen_length, decoder.special, options, device)
    model = RecordingModel(base_model, keep_logits=options.logits_atol is not None and not options.decoder_only)
    run_to_completion(model, [(seq, decoder.policy) for seq in seqs])

    result.forwards = len(model.records)
    result.nfe = max(int(seq.state.get("reference_nfe", seq.nfe)) for seq in seqs)
    problems = result.problems
    output = torch.cat([seq.canvas.cpu() for seq in seqs])
    _compare_output(output, torch.tensor(case["output"]), problems)
    if result.nfe != case["nfe"]:
        problems.append(f"nfe {result.nfe} != {case['nfe']}")
    _compare_trace(model.records, case["trace"], problems)
    if model.keep_logits and golden.has_tensors():
        result.logits_max_diff = _compare_logits(
            model.records, case["trace"], golden, options.logits_atol, options.logits_rtol, problems
        )
    if problems and isinstance(source, CpuStreamRandomSource):
        hint = draw_mismatch(source.calls, case.get("rng_draws", []))
        if hint:
            problems.append(f"rng: {hint}")
    result.passed = not problems
    return result


def _build_sequences(
    golden: GoldenFile,
    case: dict[str, Any],
    gen_length: int,
    special: SpecialIds,
    options: ConformanceOptions,
    device: torch.device,
) -> tuple[list[Sequence], RandomSource]:
    prompt = torch.tensor(case["prompt"], dtype=torch.long)
    attention_mask = case.get("kwargs", {}).get("attention_mask") or case.get("attention_mask")
    rows, prompt_len = prompt.shape
    if options.rng == "replay" and case.get("rng_draws"):
        source: RandomSource = ReplayRandomSource(case["rng_draws"], golden.tensors())
    else:
        source = CpuStreamRandomSource(case.get("seed_before_call"))
    rngs: list[RandomSource] = [source]
    if rows > 1:  # the reference draws once for all rows: share one draw list
        shared = _SharedDraws(source, rows)
        rngs = [RowRandomSource(shared, j) for j in range(rows)]
    seqs = []
    for j in range(rows):
        canvas = torch.cat([prompt[j], torch.full((gen_length,), special.mask, dtype=torch.long)])[None].to(device)
        valid = None
        if attention_mask is not None:
            row_valid = torch.tensor(attention_mask[j], dtype=torch.bool)
            valid = torch.cat([row_valid, torch.ones(gen_length, dtype=torch.bool)])[None].to(device)
        seqs.append(Sequence(canvas=canvas, prompt_len=prompt_len, special=special, rng=rngs[j], valid=valid))
    if rows > 1:  # rows of one reference call: policies that advance blocks batch-wide wait for all
        for seq in seqs:
            seq.state["batch_group"] = seqs
    return seqs, source


def _compare_output(got: torch.Tensor, want: torch.Tensor, problems: list[str]) -> None:
    if got.shape != want.shape:
        problems.append(f"output shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    diff = (got != want).nonzero()
    if diff.numel():
        r, c = (int(v) for v in diff[0])
        problems.append(
            f"output differs at {diff.shape[0]} positions, first row {r} col {c}: {int(got[r, c])} != {int(want[r, c])}"
        )


def _compare_trace(records: list[ForwardRecord], trace: list[dict[str, Any]], problems: list[str]) -> None:
    if len(records) != len(trace):
        problems.append(f"{len(records)} forwards != {len(trace)} in the trace")
    for i, (rec, entry) in enumerate(zip(records, trace)):
        want = torch.tensor(entry["input_ids"], dtype=torch.long)
        got_rows = rec.rows
        if len(got_rows) != want.shape[0] or any(r.shape[0] != want.shape[1] for r in got_rows):
            shapes = [tuple(r.shape) for r in got_rows]
            problems.append(f"forward {i}: input rows {shapes} != {tuple(want.shape)}")
            return
        order = _row_order(torch.stack(got_rows), want)
        if order is None:
            problems.append(f"forward {i}: input_ids differ")
            return
        rec.order = order
        problem = _window_problem(rec, entry)
        if problem:
            problems.append(f"forward {i}: {problem}")
            return


def _row_order(got: torch.Tensor, want: torch.Tensor) -> list[int] | None:
    """`order` with `got[order[j]] == want[j]`, identity first; None if the rows differ as a multiset.

    Rows of one forward are independent, so only their order may differ from the reference: a batched
    CFG call stacks `[x_0 .. x_B-1; u_0 .. u_B-1]`, our step loop keeps each sequence's two rows
    together (`[x_0; u_0; x_1; u_1 ...]`).
    """
    if torch.equal(got, want):
        return list(range(want.shape[0]))
    free = list(range(got.shape[0]))
    order = []
    for row in want:
        match = next((g for g in free if torch.equal(got[g], row)), None)
        if match is None:
            return None
        free.remove(match)
        order.append(match)
    return order


def _window_problem(rec: ForwardRecord, entry: dict[str, Any]) -> str | None:
    """Check the cache layout of one forward against the trace's `use_cache/past_len/replace_span`."""
    windows = rec.windows or [(0, False, False, int(r.shape[0])) for r in rec.rows]
    for (offset, use, store, length), row in zip(windows, rec.rows):
        t = int(row.shape[0])
        if "replace_span" in entry:  # dual cache: block window between frozen prefix and suffix
            lo, hi = entry["replace_span"]
            if not use or (offset, offset + t) != (lo, hi) or entry.get("past_len", length) != length:
                return (
                    f"expected a cached forward replacing [{lo}, {hi}) of {entry.get('past_len')}, "
                    f"got window [{offset}, {offset + t}) use_cache={use}"
                )
        elif "past_len" in entry:  # prefix cache: suffix window after the frozen prefix
            if not use or offset != entry["past_len"] or offset + t != length:
                return (
                    f"expected a cached suffix forward after {entry['past_len']}, "
                    f"got window [{offset}, {offset + t}) use_cache={use}"
                )
        else:  # full forward; the cache paths' full forwards (use_cache) build the cache
            if use or offset != 0 or t != length:
                return f"expected a full forward, got window [{offset}, {offset + t}) use_cache={use}"
            if bool(entry.get("use_cache", False)) != store:
                return f"full forward stores the cache: {store}, reference use_cache={entry.get('use_cache', False)}"
    return None


def _compare_logits(
    records: list[ForwardRecord],
    trace: list[dict[str, Any]],
    golden: GoldenFile,
    atol: float | None,
    rtol: float,
    problems: list[str],
) -> float | None:
    """Largest absolute logit difference over all forwards; a forward outside tolerance is a problem."""
    tensors = golden.tensors()
    worst: float | None = None
    for i, (rec, entry) in enumerate(zip(records, trace)):
        key = entry.get("logits_key")
        if key is None or key not in tensors or rec.logits is None:
            continue
        want = tensors[key].float()
        order = rec.order or list(range(rec.logits.shape[0]))
        got = rec.logits[order, : want.shape[1]]
        if got.shape != want.shape:
            problems.append(f"forward {i}: logits shape {tuple(got.shape)} != {tuple(want.shape)}")
            return worst
        # left-pad query rows are excluded: no decoder reads them, and their values depend on the
        # reference's mask form (Dream's 2-D bool mask vs a key mask), not on the model
        compared = torch.ones(want.shape[:2], dtype=torch.bool)
        if rec.valid is not None:
            compared = rec.valid[order, : want.shape[1]].clone()
        want, got = want[compared], got[compared]
        finite = torch.isfinite(want)
        if not torch.equal(finite, torch.isfinite(got)):
            problems.append(f"forward {i}: logits differ in which entries are finite")
            return worst
        delta = (got[finite] - want[finite]).abs()
        diff = float(delta.max()) if delta.numel() else 0.0
        worst = diff if worst is None else max(worst, diff)
        allowed = atol + rtol * want[finite].abs() if atol is not None else None
        if allowed is not None and not bool((delta <= allowed).all()):  # NaN fails too
            problems.append(f"forward {i}: logits max|diff| {diff:.2e} outside atol {atol:.0e} + rtol {rtol:.0e}")
            return worst
    return worst


def run_directory(
    directory: str | Path,
    options: ConformanceOptions | None = None,
    select: Iterable[str] = (),
    provide_model: ModelProvider | None = None,
) -> list[CaseResult]:
    """Replay every case of every golden file in `directory` (cases whose name contains a `select` string)."""
    options = options or ConformanceOptions()
    if provide_model is None:
        provide_model = replay_model_provider if options.decoder_only else default_model_provider(options)
    wanted = list(select)
    results = []
    for golden in load_golden_dir(directory):
        for case in golden.cases:
            if wanted and not any(w in case.get("name", "") for w in wanted):
                continue
            try:
                results.append(run_case(golden, case, options, provide_model))
            except Exception as exc:  # one broken case must not hide the others' results
                results.append(
                    CaseResult(
                        golden.path.name, case.get("name", "?"), False, problems=[f"{type(exc).__name__}: {exc}"]
                    )
                )
    return results

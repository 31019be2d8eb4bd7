"""The Gradio Blocks: layout, event wiring and the named API endpoints.

Endpoints (``gradio_client``): ``/select_model``, ``/load_checkpoint``, ``/analyze``, ``/curve``,
``/balance``, ``/export``, ``/compare``, ``/inspect`` (the token inspector, :mod:`.inspector_ui`), ``/layer_maps`` (:mod:`.layer_maps`), ``/video``
(:mod:`.video`). Model work runs in one concurrency group (``"gpu"``), comparisons in
their own (``"long"``: one configuration at a time, after any waiting interactive request) and, on a ZeroGPU
Space, under ``spaces.GPU``. Bad input raises ``gr.Error`` with the reason (wrongly typed API values too:
:mod:`.components`); the server keeps serving.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import urllib.error
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr
import numpy as np
import PIL.Image

from ..evaluation.compare import compare as compare_methods
from ..evaluation.compare import DEFAULT_MAPS, MATCH, MATCH_STEPS, check_specs, merge_maps, parse_spec
from ..merging import ONLINE
from ..methods import METHODS
from ..models import CheckpointError
from ..plots import pareto_figure, rows_to_csv
from ..preprocess import MAX_PIXELS, ImageError
from . import analysis
from .components import LabelFile, MethodChoices, NumberSlider, checked_payload
from .files import PictureFiles, TempFolders, make_temp_dir, prune_uploads, remove_stale, upload_root
from .longjobs import Budget, PriorityGate, WorkStopped, client_gone
from .gpu import forward_budget, gpu, image_pixels
from .inspector_ui import InspectorPanel
from .layer_maps import COMPARE_METHODS, LayerMapsPanel
from .models import ModelEntry, ModelRegistry
from .inputs import read_image_file, read_label_file
from .session import LRU, ImageSession, SessionCache, Settings
from .video import VideoPanel

__all__ = ["Handlers", "PictureFiles", "build_demo", "ImageInput", "EXAMPLES_DIR"]

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"
PANEL_HEIGHT = 380  # px, the image panels
#: Rows with this class stack their items in one column on a narrow screen (see :data:`APP_CSS`).
STACK = ["stack-narrow"]
#: The page's CSS (pass it to ``launch(css=...)``): under 700 px every row of the page is one column.
APP_CSS = """
@media (max-width: 700px) {
  .stack-narrow { flex-direction: column !important; flex-wrap: nowrap !important; }
  .stack-narrow > * { width: 100% !important; max-width: 100% !important; min-width: 0 !important; flex: 1 1 auto !important; }
}
"""
#: GBM's limit, stated at its slider.
GBM_CAP = ("GBM pairs tokens A→B (alternate tokens), so at most half of its input tokens merge in one step: "
           "below some τ lowering it changes nothing")
#: "How to read this", in a few lines.
HOW_TO_READ = """* **Tokens N → N′ → N″**: patches, after CLAP (layer 1), after GBM (the GBM layer). Fewer tokens = less compute.
* **CLAP panel**: a yellow square is a k×k window whose tokens became one. **GBM panel**: tokens of one colour became
  one token, even when they lie apart; clear areas were not merged by GBM. **Superpixel panel**: each final token
  painted in the mean colour of the pixels it holds: what the later layers see.
* **Segmentation**: drag the divider to compare the baseline (left) with ALGM (right); the legend lists the classes
  shown. **Red panel**: pixels whose class changed. **Ground truth**: your label map, when you give one.
* **Agreement mIoU**: how closely ALGM's segmentation matches the baseline's (100 % = identical); with a label map,
  also the real mIoU of both. **Latency**: medians of interleaved runs, as `algm-viz bench` measures.
* **τ curves**: one stage's τ varied with the other at its slider; the star is the current setting.
"""
#: The compare panel's opening merge maps (also ``/compare``'s defaults): map B is ToMe with the r whose GFLOPs
#: on the image match map A's.
MAP_A, MAP_B = DEFAULT_MAPS
#: The CLAP window and GBM layer the controls open on (:class:`~.session.Settings`' defaults, clipped to the model).
OPENING_WINDOW, OPENING_GBM_LAYER = Settings.window, Settings.global_layer
#: :meth:`Handlers.analyze`'s outputs, in order (the names of the page's view components)
VIEW_NAMES = ("local_image", "global_image", "segmentation", "disagreement", "legend", "readout", "readout_json",
              "mean_image", "ground_truth")
_USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, ImageError, WorkStopped)


def user_errors(fn: Callable) -> Callable:
    """Turn the library's input errors into ``gr.Error`` messages for the user."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except _USER_ERRORS as error:
            logger.info("%s refused: %s", fn.__name__, error)
            raise gr.Error(user_message(error)) from error

    return wrapper


def user_message(error: BaseException) -> str:
    """The message a user reads for ``error``: a network failure anywhere in its causes becomes
    ``offline: cannot reach <host> (<reason>)``; text in angle brackets (``<urlopen error ...>``, which a
    browser would take for an HTML tag and hide) loses its brackets."""
    message = str(error)
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, urllib.error.URLError) and not isinstance(cause, urllib.error.HTTPError):
            reason = getattr(cause.reason, "strerror", None) or str(cause.reason)
            host = re.search(r"https?://([^/\s:]+)", message)
            context = message.rsplit(": ", 1)[0] if message.endswith(str(cause)) else message
            return f"offline: cannot reach {host.group(1) if host else 'the server'} ({reason}): {context}"
        cause = cause.__cause__ or cause.__context__
    return re.sub(r"<([^<>]*)>", r"\1", message) or type(error).__name__


class ImageInput(gr.Image):
    """``gr.Image`` that answers a file that is no image with a clear message instead of a bare error.
    Use it with ``type="filepath", image_mode=None`` so the file reaches the app unchanged (16-bit, RGBA, ...)."""

    is_template = True  # rendered by the frontend's Image component (props come from gr.Image's signature)
    data_model = checked_payload(gr.Image.data_model, "the image")  # a clear message for a non-file payload

    def preprocess(self, payload: Any) -> str | None:
        try:
            return super().preprocess(payload)  # opens the header only (type="filepath", image_mode=None)
        except PIL.Image.DecompressionBombError as error:
            raise gr.Error(f"{self._name(payload)} is larger than {MAX_PIXELS // 1_000_000} megapixels: refused") from error
        except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise gr.Error(f"{self._name(payload)} is not an image this app can read (corrupt file or unsupported format)") from error

    @staticmethod
    def _name(payload: Any) -> str:
        return Path(getattr(payload, "orig_name", None) or getattr(payload, "path", None) or "the upload").name


def opening_settings(entry: ModelEntry) -> Settings:
    """The setting the controls open on for ``entry`` (its calibrated τ rounded as the sliders show them,
    the :data:`OPENING_WINDOW` window, GBM at :data:`OPENING_GBM_LAYER`): what the pre-run computes, so the
    page's first request finds it cached, and the API's defaults (for the default model)."""
    auto = entry.auto_thresholds
    return Settings(round(auto["local"], 3), round(auto["global"], 3), min(OPENING_WINDOW, entry.windows()[-1]),
                    min(OPENING_GBM_LAYER, entry.depth))


def _file_identity(path: str) -> tuple[str, int, int] | str:
    """``(resolved path, size, mtime ns)`` of a file; the path itself when there is no such file (so that
    reading it raises the usual error)."""
    try:
        status = Path(path).stat()
    except OSError:
        return str(path)
    return str(Path(path).resolve()), status.st_size, status.st_mtime_ns


class Handlers:
    """The app's functions, free of layout: each takes and returns plain values (API-friendly).

    Args:
        registry: the models.
        sessions: the per-image cache.
        thresholds: τ of the per-image curve.
        with_gflops: count GFLOPs for each setting (one extra forward per new setting).
        long_budget_s: wall-time budget of one long request (compare, τ curve, export); it stops between
            configurations when spent, or as soon as its client has gone (see :mod:`.longjobs`).
        upload_caps: ``(files, bytes)`` Gradio may keep for this app (uploads and copies); the oldest
            go first (:func:`~.files.prune_uploads`; Gradio's ``delete_cache`` also removes them by age).

    Interactive requests (analyze, curve, balance, export) go before the steps of a comparison
    (:class:`~.longjobs.PriorityGate`), which holds the model for one configuration at a time.
    """

    def __init__(self, registry: ModelRegistry, sessions: SessionCache | None = None,
                 thresholds: Sequence[float] = analysis.CURVE_THRESHOLDS, with_gflops: bool = True,
                 long_budget_s: float = 180.0, upload_caps: tuple[int, int] = (500, 2 * 2**30)) -> None:
        self.registry = registry
        self.long_budget_s = long_budget_s
        self.upload_caps = upload_caps
        self.gate = PriorityGate()
        self.blocks: gr.Blocks | None = None  # set by build_demo: disconnects are read from its queue
        self.opening_key: tuple[str, str, str | None] | None = None  # (model, image, label) the page opens on
        self.sessions = sessions or SessionCache()
        self.thresholds = tuple(thresholds)
        self.with_gflops = with_gflops
        remove_stale()  # left by earlier runs that were killed
        self.pictures = PictureFiles()
        self.exports = TempFolders("export", root=upload_root())
        self._by_file: LRU[ImageSession] = LRU(self.sessions.capacity)
        registry.on_evict(self._forget_sessions)

    def _forget_sessions(self, model_key: str) -> None:
        """Drop the per-image caches when a model leaves the registry, so that its memory is freed."""
        self.sessions = SessionCache(self.sessions.capacity, self.sessions.max_side)
        self._by_file = LRU(self.sessions.capacity)

    def _session(self, model: str, image: str, label: str | None) -> ImageSession:
        """The session of these files; a file seen before (same path, size and modification time) is not
        decoded and hashed again: one τ release asks for the session three times (view, curve, balance)."""
        entry = self.registry.get(model)
        for upload in (image, label):
            if upload and not Path(upload).is_file():
                raise ImageError(f"{Path(upload).name} is no longer on the server (uploads are kept for a while): "
                                 "upload it again")
        key = (entry.key, _file_identity(image), _file_identity(label) if label else None)
        session = self._by_file.get(key, lambda: self.sessions.get(entry, read_image_file(image),
                                                                    read_label_file(label) if label else None))
        if self.blocks is not None:
            prune_uploads(self.blocks, *self.upload_caps)
        return session

    def model_info(self, model: str) -> tuple[ModelEntry, str]:
        entry = self.registry.get(model)
        auto = entry.auto_thresholds
        text = (f"**{entry.label}** · {entry.model.num_classes} classes · {entry.depth} layers · "
                f"input short side {entry.short_side}px (long side ≤ {self.sessions.max_side}px) · "
                f"auto τ (μ+σ): local {auto['local']:.3f}, global {auto['global']:.3f} · on `{entry.device}`")
        return entry, text

    @user_errors
    def select_model(self, model: str, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        """-> (local τ slider, global τ slider, global-layer slider, status Markdown, dataset curve)."""
        entry, text = self.model_info(model)
        auto, opening = entry.auto_thresholds, opening_settings(entry)
        tau_min = min(0.5, auto["local"], auto["global"])
        return (
            gr.Slider(minimum=tau_min, maximum=1.0, value=opening.local_threshold),
            gr.Slider(minimum=tau_min, maximum=1.0, value=opening.global_threshold),
            gr.Slider(minimum=1, maximum=entry.depth, value=opening.global_layer),
            text,
            gr.Plot(analysis.dataset_curve(entry.sweep_rows, auto["local"], entry.sweep_source), visible=entry.sweep_rows is not None),
        )

    def fit_label(self, image: str | None, label: str | None) -> str | None:
        """``label`` if it fits ``image`` (same size), else None with a note: a new image replaces the
        example whose label map is still loaded. Unreadable files are left to the analysis to report."""
        if not image or not label:
            return label
        try:
            fits = read_image_file(image).shape[:2] == read_label_file(label).shape[:2]
        except (ImageError, OSError, ValueError):
            return label
        if not fits:
            gr.Info(f"{Path(label).name} belongs to another image: label map removed")
        return label if fits else None

    def analyze_image(self, model: str, image: str | None, label: str | None, *settings: Any):
        """A new image in one request: -> (the label map if it fits the image (:meth:`fit_label`), then
        :meth:`analyze`'s outputs with it)."""
        label = self.fit_label(image, label)
        return (label, *self.analyze(model, image, label, *settings))

    @user_errors
    def check_model(self, model: str) -> None:
        """Load ``model`` (kept in the registry), or raise ``gr.Error`` with the cause. The page runs this
        before it changes any control, so a model that fails leaves the previous one, its controls and
        its results in place."""
        self.registry.get(model)

    @user_errors
    def select_window(self, model: str, window: int):
        """-> the CLAP window radio with the sides that fit the model's patch grid (``window`` kept if it fits)."""
        sides = self.registry.get(model).windows()
        return gr.Radio(choices=sides, value=window if window in sides else min(OPENING_WINDOW, sides[-1]))

    @user_errors
    def load_checkpoint(self, path: str | None, files: Sequence[str] | None, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        """A local folder, or uploaded ``checkpoint.pth`` + ``variant.yml`` -> the model dropdown set to it."""
        if files:
            roles = {("variant.yml" if Path(f).suffix.lower() in (".yml", ".yaml") else "checkpoint.pth"): f for f in files}
            if len(files) != 2 or len(roles) != 2:
                raise gr.Error(f"upload exactly checkpoint.pth and variant.yml (got {sorted(Path(f).name for f in files)})")
            folder = make_temp_dir("ckpt")
            for name, file in roles.items():
                (folder / name).symlink_to(Path(file).resolve())
            key = self.registry.add_folder(folder)
        elif path and path.strip():
            key = f"path:{Path(path.strip()).expanduser().resolve()}"
        else:
            raise gr.Error("give a checkpoint folder path or upload checkpoint.pth and variant.yml")
        entry = self.registry.get(key)
        choices = self.registry.choices() + [(entry.label, key)]
        return gr.Dropdown(choices=choices, value=key)

    def opening_view(self, model: str, image: str, label: str | None = None) -> tuple[Any, ...] | None:
        """:meth:`analyze`'s outputs for ``image`` at the opening setting, computed now: the page's initial
        outputs, so that it opens with results and sends no request for them. None (logged) when that fails:
        the page then computes them on load."""
        try:
            with self.gate.interactive():
                result = analysis.analyze(self._session(model, image, label), self.settings(), self.with_gflops)
        except Exception:  # the page falls back to analysing on load
            logger.exception("opening view of %s failed", image)
            return None
        return self._view(result, functools.partial(self.pictures.save, keep=True))  # shown as long as the server runs

    def shows_opening(self, model: str, image: str | None, label: str | None, *settings: Any) -> bool:
        """Whether an analysis request asks for what :meth:`opening_view` of the first street example shows."""
        if self.opening_key is None:
            return False
        files = [_file_identity(path) if path else None for path in (image, label, *self.opening_key[1:])]
        return model == self.opening_key[0] and files[:2] == files[2:] and self.settings(*settings) == self.opening()

    def prerun(self, model: str, image: str, label: str | None = None) -> threading.Thread:
        """Compute, in a background thread, what the page shows first for ``image`` with ``model`` at its
        default setting (the forwards, timings, τ curves and balance land in the session caches), so that the
        first visitors get cached results. Failures are logged, never raised."""
        def work() -> None:
            try:
                settings = opening_settings(self.registry.get(model))
                with self.gate.interactive():
                    session = self._session(model, image, label)
                    analysis.analyze(session, settings, self.with_gflops)
                    analysis.curve(session, settings, self.thresholds)
                    analysis.balance(session, settings)
            except Exception:  # a pre-run is an optimisation: the page computes it on demand instead
                logger.exception("pre-run of %s failed", image)

        thread = threading.Thread(target=work, name="algm-viz-prerun", daemon=True)
        thread.start()
        return thread

    def settings(self, local_tau: float | None = None, global_tau: float | None = None, window: int | None = None,
                 global_layer: int | None = None, prop_attn: bool = False, official: bool = False) -> Settings:
        """The setting of the controls; a value of None is the page's opening one (:meth:`opening`: the
        default model's calibrated τ, as the API page's defaults); ``official``: GBM's τ is the official ALGM
        code's online one (the global τ slider is then ignored)."""
        if not isinstance(official, (bool, np.bool_)):
            raise gr.Error(f"the official-τ switch must be true or false, got {str(official)[:40]!r}")
        if None in (local_tau, global_tau, window, global_layer):
            opening = self.opening()
            local_tau = opening.local_threshold if local_tau is None else local_tau
            global_tau = opening.global_threshold if global_tau is None else global_tau
            window = opening.window if window is None else window
            global_layer = opening.global_layer if global_layer is None else global_layer
        return Settings(local_tau, ONLINE if official else global_tau, window, global_layer, prop_attn=prop_attn)

    def opening(self) -> Settings:
        """The setting the page opens on: the default model's :func:`opening_settings`."""
        return opening_settings(self.registry.get(self.registry.default_key()))

    def budget(self, request: gr.Request | None = None) -> Budget:
        """The time budget of one long request, stopping early when its client leaves."""
        return Budget(self.long_budget_s, client_gone(self.blocks, getattr(request, "session_hash", None)))

    @user_errors
    def analyze(self, model: str, image: str | None, label: str | None = None, local_tau: float | None = None,
                global_tau: float | None = None, window: int | None = None, global_layer: int | None = None,
                prop_attn: bool = False, official: bool = False):
        """-> (CLAP overlay, GBM overlay, (baseline, ALGM) segmentation, disagreement, legend, readout Markdown,
        readout dict, tokens in their mean colours, ground truth or None)."""
        if not image:
            return None, None, None, None, None, "Upload an image or pick an example.", None, None, None
        settings = self.settings(local_tau, global_tau, window, global_layer, prop_attn, official)
        with self.gate.interactive():
            session = self._session(model, image, label)
            result = analysis.analyze(session, settings, self.with_gflops)
        return self._view(result, self.pictures.save)

    @staticmethod
    def _view(result: analysis.Analysis, save: Callable[[np.ndarray], str]) -> tuple[Any, ...]:
        """An analysis -> the view outputs (:data:`VIEW_NAMES`), its pictures written by ``save``."""
        return (save(result.local_overlay), save(result.global_overlay), (save(result.baseline_overlay), save(result.algm_overlay)),
                save(result.disagreement), save(result.legend), analysis.readout_markdown(result.readout), result.readout,
                save(result.mean_colors), None if result.ground_truth is None else save(result.ground_truth))

    @user_errors
    def curve(self, model: str, image: str | None, label: str | None = None, local_tau: float | None = None,
              global_tau: float | None = None, window: int | None = None, global_layer: int | None = None,
              prop_attn: bool = False, official: bool = False, request: gr.Request | None = None):
        """-> (per-image τ curve figure, dataset curve figure or None)."""
        if not image:
            return None, None
        settings = self.settings(local_tau, global_tau, window, global_layer, prop_attn, official)
        with self.gate.interactive():
            session = self._session(model, image, label)
            figure, _ = analysis.curve(session, settings, self.thresholds, self.budget(request).check)
        return figure, analysis.dataset_curve(session.entry.sweep_rows, settings.local_threshold, session.entry.sweep_source)

    @user_errors
    def balance(self, model: str, image: str | None, label: str | None = None, local_tau: float | None = None,
                global_tau: float | None = None, window: int | None = None, global_layer: int | None = None,
                prop_attn: bool = False, official: bool = False):
        """-> (attention-balance figure, one-line summary)."""
        if not image:
            return None, ""
        settings = self.settings(local_tau, global_tau, window, global_layer, prop_attn, official)
        with self.gate.interactive():
            session = self._session(model, image, label)
            figure, summary, _ = analysis.balance(session, settings)
        return figure, summary

    @user_errors
    def check_compare(self, image: str | None, methods: Sequence[str], map_a: str, map_b: str) -> list:
        """The two merge-map specs, or ``gr.Error`` naming the first bad input (the page checks before it
        runs a comparison, so a typo leaves the previous results in place)."""
        if not image:
            raise gr.Error("upload an image (or pick an example) first")
        if not isinstance(methods, (list, tuple)) or not methods:
            raise gr.Error("pick at least one method to compare")
        unknown = [m for m in methods if not isinstance(m, str) or m not in METHODS]
        if unknown:
            raise gr.Error(f"unknown methods {str(unknown)[:80]}: choose from {', '.join(METHODS)}")
        specs = [parse_spec(map_a), parse_spec(map_b)]
        check_specs(specs)
        return specs

    @user_errors
    def compare(self, model: str, image: str | None, label: str | None = None, methods: Sequence[str] = COMPARE_METHODS,
                map_a: str = MAP_A, map_b: str = MAP_B, request: gr.Request | None = None,
                progress: gr.Progress = gr.Progress()):
        """Compare token reducers on one image: each method in ``methods`` (e.g. ``["algm", "tome"]``) runs at
        each value of its own knob; returns quality against GFLOPs, quality against throughput (quality =
        agreement with the unmerged model's prediction, or mIoU with a label map) and the merge maps of
        ``map_a`` and ``map_b`` (``method:value``, e.g. ``algm:0.9``; map B may be ``method:match``, e.g.
        ``tome:match``: its knob set so that its GFLOPs on the image match map A's) side by side. Long
        comparisons stop after a time budget or when the caller disconnects."""
        specs = self.check_compare(image, methods, map_a, map_b)
        budget = self.budget(request)
        session = self._session(model, image, label)
        entry = session.entry
        reference = None if session.label is None else session.label.astype(np.uint8)

        def step(done: int, total: int):
            budget.check(done, total)
            progress((done, total), desc="configurations")  # also lets Gradio notice a closed connection
            return self.gate.background(entry.lock, lambda: budget.check(done, total))

        rows = compare_methods(entry.model, session.image, list(methods), label=reference, repeats=2, step=step)
        with step(len(rows), len(rows) + 1):
            maps = merge_maps(entry.model, session.image, specs)
        quality = "agreement with baseline (mIoU %)" if reference is None else "mIoU against the label map (%)"
        figures = [pareto_figure(rows, "gflops"), pareto_figure(rows, "images_per_s")]
        for figure, x in zip(figures, ("GFLOPs", "throughput")):
            figure.update_layout(yaxis_title=quality, title=f"{quality.split(' (')[0].capitalize()} against {x}")
        return figures[0], figures[1], self.pictures.save(maps)

    @user_errors
    def export(self, model: str, image: str | None, label: str | None = None, local_tau: float | None = None,
               global_tau: float | None = None, window: int | None = None, global_layer: int | None = None,
               prop_attn: bool = False, official: bool = False, request: gr.Request | None = None) -> list[str]:
        """Write the figures' data: readout JSON, per-image curve CSV + JSON, attention balance JSON."""
        if not image:
            raise gr.Error("nothing to export yet: upload an image first")
        settings = self.settings(local_tau, global_tau, window, global_layer, prop_attn, official)
        with self.gate.interactive():
            session = self._session(model, image, label)
            readout = analysis.analyze(session, settings, self.with_gflops).readout
            _, rows = analysis.curve(session, settings, self.thresholds, self.budget(request).check)
            _, _, stats = analysis.balance(session, settings)
        folder = self.exports.new()
        (folder / "readout.json").write_text(json.dumps(readout, indent=2))
        (folder / "tau_curve.json").write_text(json.dumps(rows, indent=2))
        rows_to_csv(rows, folder / "tau_curve.csv", session.entry.class_names)
        (folder / "attention_balance.json").write_text(json.dumps({**stats, "class_names": list(session.entry.class_names)}, indent=2))
        return [str(p) for p in sorted(folder.iterdir())]


def _examples() -> tuple[list[list[str]], list[list[str | None]]]:
    """``([image, label map]`` of each street scene (those with a map in ``labels/``), ``[image, None]`` of
    each other picture``)`` in :data:`EXAMPLES_DIR`."""
    suffixes = {".png", ".jpg", ".jpeg", ".webp"}
    pictures = sorted(p for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in suffixes) if EXAMPLES_DIR.is_dir() else []
    labelled = [p for p in pictures if (EXAMPLES_DIR / "labels" / p.name).is_file()]
    return ([[str(p), str(EXAMPLES_DIR / "labels" / p.name)] for p in labelled],
            [[str(p), None] for p in pictures if p not in labelled])


def _files_now(paths: Sequence[str | None]) -> str:
    """A page-side function of the (image, label) inputs: those inputs where the visitor has already given an
    image, else ``paths`` (files in Gradio's cache) as file values. The page's load needs no request for it,
    and an upload made as the page opens is never replaced by the example."""
    files = [None if p is None else {"path": p, "orig_name": Path(p).name, "meta": {"_type": "gradio.FileData"}}
             for p in paths]
    return (f"(image, label) => image ? [image, label] : {json.dumps(files)}.map(f => f && {{...f, "
            "url: new URL('gradio_api/file=' + f.path, window.gradio_config.root).href})")


def _kept_in_cache(component: gr.components.Component, path: str | None) -> str | None:
    """``path`` copied into Gradio's cache for ``component`` and marked to keep (as an initial value or an
    example is), so that the upload caps never remove the picture every page opens on."""
    if path is None:
        return None
    cached = component.move_resource_to_block_cache(path)
    component.keep_in_cache.add(cached)
    return cached


def _zero_gpu_wrappers(curve_points: int) -> dict[str, Callable[[Callable], Callable]]:
    """Per endpoint, the ``spaces.GPU`` decorator whose duration follows the request: forward passes the
    handler runs (from its arguments: curve length, compared methods × knob values) times the image's pixels."""
    forwards: dict[str, Callable[..., int]] = {
        "analyze": lambda *_: 2,
        "curve": lambda *_: curve_points + 1,
        "balance": lambda *_: 2,
        "export": lambda *_: curve_points + 5,
        "compare": lambda label, methods, *maps: (2 * (1 + sum(len(METHODS[m].values) for m in methods or () if m in METHODS))
                                                  + 2 + sum(MATCH_STEPS for spec in maps[:2] if _matches(spec))),
    }
    return {name: gpu(lambda model, image, *rest, count=count: forward_budget(count(*rest), image_pixels(image)))
            for name, count in forwards.items()}


def _matches(spec: Any) -> bool:
    """Whether a merge-map field asks for a GFLOPs match (``method:match``)."""
    return isinstance(spec, str) and spec.strip().endswith(f":{MATCH}")


def build_demo(handlers: Handlers | None = None, gpu_concurrency: int = 1,
               delete_cache: tuple[int, int] | None = (300, 1800), prerun: bool = True) -> gr.Blocks:
    """The app. ``gpu_concurrency``: model requests run at once (queue concurrency group ``"gpu"``).
    ``delete_cache``: Gradio's ``(every, age)`` seconds removal of the uploads and other files it stored
    for this app (None: keep them until the server stops). ``prerun``: the page opens on the first street
    example with its results as the outputs' initial values (:meth:`Handlers.opening_view`, computed now),
    and its τ curve and balance computed in the background (:meth:`Handlers.prerun`), so that every visitor
    sees results at once; without it (ZeroGPU: no CUDA in the main process) the page analyses it on load."""
    handlers = handlers or Handlers(ModelRegistry())
    default = handlers.registry.default_key()
    entry, status = handlers.model_info(default)
    auto, start = entry.auto_thresholds, opening_settings(entry)
    on_gpu = _zero_gpu_wrappers(len(handlers.thresholds))
    work = {"concurrency_id": "gpu", "concurrency_limit": gpu_concurrency}
    streets, photos = _examples()
    first = streets[0] if streets else [None, None]  # the page opens on it

    with gr.Blocks(title="ALGM token merging", delete_cache=delete_cache) as demo:
        gr.Markdown("# ALGM: see token merging in a segmentation ViT\n"
                    "Adaptive Local-then-Global Merging (CVPR 2024): CLAP merges similar k×k windows in layer 1, "
                    "GBM merges similar tokens anywhere in a later layer. Pick an example or upload an image, then drag τ.")
        with gr.Accordion("How to read this", open=False, elem_id="how-to-read"):
            gr.Markdown(HOW_TO_READ)
        model = gr.Dropdown(choices=handlers.registry.choices(), value=default, label="Model",
                            allow_custom_value=True)  # API: any registry key, e.g. "path:<folder>"
        with gr.Accordion("Your own checkpoint (official Segmenter format: checkpoint.pth + variant.yml)", open=False,
                          elem_id="checkpoint-inputs"):
            with gr.Row(elem_classes=STACK):
                checkpoint_path = gr.Textbox(label="A checkpoint folder on this server", placeholder="/models/seg_tiny_mask")
                checkpoint_files = gr.File(label="…or upload checkpoint.pth + variant.yml", file_count="multiple",
                                           file_types=[".pth", ".yml", ".yaml"])
        model_status = gr.Markdown(status)
        with gr.Row(elem_classes=STACK):
            image = ImageInput(type="filepath", image_mode=None, sources=["upload", "clipboard"], height=320,
                               label=f"Image (resized to the model's short side; long side ≤ {handlers.sessions.max_side}px)",
                               elem_id="input-image")
            with gr.Column():
                label = LabelFile(label="Optional label map (PNG of class ids) for real mIoU", type="filepath",
                                file_types=["image"], elem_id="input-label")
                if streets:
                    gr.Examples(examples=streets, inputs=[image, label], elem_id="street-examples",
                                label="Street scenes (drawn by this project, with label maps): what the CamVid model knows")
                if photos:
                    gr.Examples(examples=photos, inputs=[image, label], elem_id="photo-examples",
                                label="Photos outside the CamVid model's training domain (public domain)")
        opening = [_kept_in_cache(component, path) for component, path in zip((image, label), first)]
        view = handlers.opening_view(default, *opening) if prerun and opening[0] else None
        if view is not None:
            handlers.opening_key = (default, *opening)
            handlers.prerun(default, *opening)
        shown = dict(zip(VIEW_NAMES, view or ()))  # the outputs' initial values
        with gr.Row(elem_classes=STACK):
            local_tau = NumberSlider(min(0.5, auto["local"]), 1.0, value=start.local_threshold, step=0.005,
                                     label="τ local (CLAP)", elem_id="tau-local",
                                     info="a k×k window merges when its tokens' mean cosine similarity is above τ")
            global_tau = NumberSlider(min(0.5, auto["global"]), 1.0, value=start.global_threshold, step=0.005,
                                      label="τ global (GBM)", elem_id="tau-global", info=GBM_CAP)
            global_official = gr.Checkbox(False, label="τ global: official (online)", elem_id="tau-global-official",
                                          info="as the official ALGM code: GBM's τ = mean + std / layer of each "
                                               "image's best-edge similarities (the slider is ignored)")
            auto_button = gr.Button("τ = auto (μ+σ)", scale=0)
        with gr.Row(elem_classes=STACK):
            window = gr.Radio(entry.windows(), value=start.window, label="CLAP window k×k (1 = no local merging)")
            global_layer = NumberSlider(1, entry.depth, value=start.global_layer, step=1, label="GBM layer")
            prop_attn = gr.Checkbox(False, label="Proportional attention", elem_id="prop-attn",
                                    info="a merged token weighs in attention as the patches it holds (ToMe); "
                                         "off = the paper's code")
        readout = gr.Markdown(shown.get("readout"), elem_id="readout")
        panel = {"format": "png", "height": PANEL_HEIGHT}
        with gr.Row(equal_height=True, elem_classes=STACK):
            local_image = gr.Image(label="CLAP: yellow = a k×k window merged into one token (white outline)",
                                   value=shown.get("local_image"), elem_id="local-overlay", **panel)
            global_image = gr.Image(label="GBM: one colour per merged group (may be far apart; black outline), "
                                          "clear = not merged by GBM", value=shown.get("global_image"),
                                    elem_id="global-overlay", **panel)
            mean_image = gr.Image(label="Tokens as superpixels: each final token in its mean colour",
                                  value=shown.get("mean_image"), elem_id="mean-colors", **panel)
        with gr.Row(equal_height=True, elem_classes=STACK):
            segmentation = gr.ImageSlider(shown.get("segmentation"), label="Segmentation: baseline ⟷ ALGM (drag the divider)", format="png",
                                          max_height=PANEL_HEIGHT, elem_id="segmentation", scale=3)
            legend = gr.Image(shown.get("legend"), label="Classes", format="png", height=PANEL_HEIGHT, elem_id="legend", scale=1,
                              min_width=160)
        with gr.Row(equal_height=True, elem_classes=STACK):
            disagreement = gr.Image(shown.get("disagreement"),
                                    label="Red: pixels where ALGM and the baseline disagree (the rest dimmed)",
                                    elem_id="disagreement", **panel)
            ground_truth = gr.Image(shown.get("ground_truth"),
                                    label="Ground truth: your label map in the class colours (black = ignored)",
                                    elem_id="ground-truth", **panel)
        inspector_panel = InspectorPanel(handlers, PANEL_HEIGHT)
        curve_plot = gr.Plot(label="This image: τ curve", elem_id="curve-plot")
        dataset_plot = gr.Plot(analysis.dataset_curve(entry.sweep_rows, auto["local"], entry.sweep_source), label="Data set: τ curve",
                               visible=entry.sweep_rows is not None)
        balance_plot = gr.Plot(label="Attention balance per predicted class (paper Sec. 5.4)")
        balance_summary = gr.Markdown()
        with gr.Accordion("Compare token reducers on this image (ALGM, ToMe, Segformer++, CTS-style, Expedite, AiluRus)",
                          open=False):
            gr.Markdown("Each method over its own knob (τ, r, k, ratio, budget, keep); quality is the agreement with the "
                        "baseline prediction (or the mIoU with a label map). CTS-style sharing uses a training-free "
                        "stand-in policy (superpatch colour homogeneity), not CTS's trained CNN. The merge maps "
                        "open on ALGM and ToMe at ALGM's GFLOPs (`tome:match`: the r whose GFLOPs on this image "
                        "come closest to map A's), so both spend the same compute.")
            compare_methods_box = MethodChoices([(METHODS[m].label, m) for m in METHODS], value=list(COMPARE_METHODS),
                                                label="Methods")
            with gr.Row(elem_classes=STACK):
                map_a = gr.Textbox(MAP_A, label="Merge map A (method:value)")
                map_b = gr.Textbox(MAP_B, label="Merge map B (method:value, or method:match = at map A's GFLOPs)",
                                   info=f"{MAP_B}: ToMe at ALGM's GFLOPs")
                compare_button = gr.Button("Compare", variant="primary", scale=0)
            with gr.Row(elem_classes=STACK):
                pareto_gflops = gr.Plot(label="Quality against GFLOPs")
                pareto_speed = gr.Plot(label="Quality against throughput")
            compare_maps = gr.Image(label="Final merge groups: A | B", format="png", elem_id="compare-maps")
            layer_panel = LayerMapsPanel(handlers, entry.depth)
        video_panel = VideoPanel(handlers)
        with gr.Accordion("Download the figures' data (JSON/CSV)", open=False):
            export_button = gr.Button("Prepare files")
            export_files = gr.File(label="Files", file_count="multiple")
        readout_json = gr.JSON(shown.get("readout_json"), label="Readout (JSON)", visible=False)

        inputs = [model, image, label, local_tau, global_tau, window, global_layer, prop_attn]
        algm_inputs = [*inputs, global_official]  # the analysis endpoints also take the official-τ switch
        model_outputs = [local_tau, global_tau, global_layer, model_status, dataset_plot]
        view_outputs = [local_image, global_image, segmentation, disagreement, legend, readout, readout_json, mean_image,
                        ground_truth]

        def chain(event: Any, public: bool = False, event_inputs: Sequence[Any] = algm_inputs) -> None:
            """After ``event`` succeeded: the τ curve, then the attention balance (named endpoints once), of
            ``event_inputs``; a failed step stops the chain, so its one toast is the only one."""
            names = ({"api_name": "curve"}, {"api_name": "balance"}) if public else ({"api_visibility": "private"},) * 2
            event.success(on_gpu["curve"](handlers.curve), event_inputs, [curve_plot, dataset_plot], **names[0], **work) \
                 .success(on_gpu["balance"](handlers.balance), event_inputs, [balance_plot, balance_summary], **names[1], **work)

        # a label map the user uploads or clears (.change would also fire when an example or the page's opening
        # sets it along with its image, whose own change runs the analysis: a second run, whose progress overlay
        # covered the merge maps and took their clicks)
        triggers = [label.upload, label.clear, local_tau.release, global_tau.release, window.change,
                    global_layer.release, prop_attn.change, global_official.change]
        chain(gr.on(triggers, on_gpu["analyze"](handlers.analyze), algm_inputs, view_outputs, api_name="analyze",
                    trigger_mode="always_last", **work), public=True)
        # a new image drops a label map that belongs to another image (an example's) and is analysed, in one
        # request; the opening example, which the page's load sets, is already on screen (its initial values).
        # What follows it (curve, balance, purity) takes the image and label map analysed, not the inputs when
        # it runs: the page sets a visitor's image before its change event, still beside the previous label map
        opening_shown = gr.State(view is not None)
        analysed = [gr.State(), gr.State()]  # (image, label map) of the last new-image analysis
        analyze_image = on_gpu["analyze"](handlers.analyze_image)

        def analyze_new_image(*values: Any) -> tuple[Any, ...]:
            """(``algm_inputs``' values, whether the opening view is shown) -> (label, view outputs, False, the
            image and label map analysed)."""
            *values, showing_opening = values
            image_path, label_path = values[1:3]
            if showing_opening and handlers.shows_opening(*values):
                return (gr.skip(),) * (1 + len(view_outputs)) + (False, image_path, label_path)
            label_path, *views = analyze_image(*values)
            return (label_path, *views, False, image_path, label_path)

        new_image = image.change(analyze_new_image, [*algm_inputs, opening_shown],
                                 [label, *view_outputs, opening_shown, *analysed],
                                 api_visibility="private", trigger_mode="always_last", **work)
        analysed_inputs = [model, *analysed, *inputs[3:]]  # ``inputs`` with the image and label map analysed
        chain(new_image, event_inputs=[*analysed_inputs, global_official])
        if opening[0]:  # set on load, not as initial values: those would become the API's defaults
            demo.load(None, [image, label], [image, label], js=_files_now(opening))
        inspector_panel.wire(inputs, image, [local_image, global_image],
                             [demo.load, label.upload, label.clear, local_tau.release, global_tau.release, window.change,
                              global_layer.release, prop_attn.change], new_image, analysed_inputs, work)
        current_model = gr.State(default)  # the model whose controls and results the page shows

        def switch_model(event: Any, public: bool = False) -> None:
            """After ``event`` checked the dropdown's model: its controls, window, view and curves."""
            chain(event.success(handlers.select_model, [model], model_outputs,
                                **({"api_name": "select_model"} if public else {"api_visibility": "private"}), **work)
                  .success(lambda key: key, [model], [current_model], api_visibility="private")
                  .success(handlers.select_window, [model, window], [window], api_visibility="private")
                  .success(on_gpu["analyze"](handlers.analyze), algm_inputs, view_outputs, api_visibility="private", **work))

        # a user's pick is loaded first, with no visible output: on failure one toast says why and the
        # dropdown goes back to the model still shown (.input: that reset does not fire again)
        picked = model.input(handlers.check_model, [model], None, api_visibility="private", **work)
        picked.failure(lambda key: key, [current_model], [model], api_visibility="private")
        switch_model(picked, public=True)
        switch_model(gr.on([checkpoint_path.submit, checkpoint_files.upload], handlers.load_checkpoint,
                           [checkpoint_path, checkpoint_files], [model], api_name="load_checkpoint", **work))
        chain(auto_button.click(lambda m: tuple(round(handlers.registry.get(m).auto_thresholds[k], 3) for k in ("local", "global")),
                                [model], [local_tau, global_tau], api_visibility="private")
              .then(on_gpu["analyze"](handlers.analyze), algm_inputs, view_outputs, api_visibility="private", **work))
        export_button.click(on_gpu["export"](handlers.export), algm_inputs, [export_files], api_name="export", **work)
        # its own queue: a comparison runs beside the interactive requests, which go first (PriorityGate)
        compare_button.click(handlers.check_compare, [image, compare_methods_box, map_a, map_b], None,
                             api_visibility="private") \
            .success(on_gpu["compare"](handlers.compare), [model, image, label, compare_methods_box, map_a, map_b],
                             [pareto_gflops, pareto_speed, compare_maps], api_name="compare",
                             concurrency_id="long", concurrency_limit=1)
        layer_panel.wire([model, image, label, compare_methods_box, map_a, map_b], work)
        video_panel.wire(model, [local_tau, global_tau, window, global_layer, prop_attn])
    handlers.blocks = demo
    return demo

"""`captioner serve`: a web page and a JSON API that caption uploaded images with one loaded checkpoint, or with
several decoding as one ensemble (ensemble.py).

Standard library only (http.server): one model in memory and one lock around it, so concurrent requests are
decoded one at a time while reading uploads and decoding JPEGs run in parallel in the request threads (attention
figures are drawn one at a time too, under their own lock). The listen backlog is raised from http.server's 5 so a
burst of simultaneous clients is queued by the kernel instead of refused. Binds to 127.0.0.1 unless told otherwise:
the page has no authentication.

API: POST /api/caption, multipart/form-data with a file field `image` and optional fields `beam_size`
(1..MAX_BEAM_SIZE, default 1), `num_captions` (1..beam_size, default 1), `length_penalty` (0..MAX_LENGTH_PENALTY)
and `no_repeat_ngram` (0..MAX_NO_REPEAT_NGRAM; both default to the server's --length-penalty and --no-repeat-ngram)
and `attention` (1 to add per-word attention maps and the figure; one model's, so not for an ensemble). Errors
come back as {"error": message} with a 4xx status. GET /api/health describes the model, the decoding defaults and
the limits.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch
from PIL import Image, UnidentifiedImageError

from . import visualize
from .data.images import MAX_IMAGE_PIXELS, load_image_bytes
from .data.transforms import resize_to_tensor
from .decoding import DecodeOptions
from .engine import decode_images
from .ensemble import Ensemble
from .errors import CaptionerError, ImageReadError
from .multipart import MultipartError, parse_form
from .text import Tokenizer

log = logging.getLogger(__name__)

MAX_BEAM_SIZE = 8
MAX_LENGTH_PENALTY = 5.0  # GNMT alpha; published settings lie within 0..2
MAX_NO_REPEAT_NGRAM = 10
PAGE = Path(__file__).with_name("serve_page.html")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 2**20  # whole request body, multipart framing included
    max_pixels: int = 25_000_000  # width x height of the decoded image (a 20 MP photo fits)


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the client."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class RankingDefaults:
    """How the server ranks and restricts beams when a request does not say (serve's --length-penalty and
    --no-repeat-ngram): the decoding setting chosen on a dev split belongs to the model, not to each client."""
    length_penalty: float = 0.0
    no_repeat_ngram: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise CaptionerError(f"--length-penalty must be between 0 and {MAX_LENGTH_PENALTY:g}, "
                                 f"got {self.length_penalty:g}")
        if not 0 <= self.no_repeat_ngram <= MAX_NO_REPEAT_NGRAM:
            raise CaptionerError(f"--no-repeat-ngram must be between 0 and {MAX_NO_REPEAT_NGRAM}, "
                                 f"got {self.no_repeat_ngram}")


class CaptionService:
    """Captions PIL images with one model (a Captioner or an Ensemble). Inference holds a lock: a model is not
    safe to run from several threads at once (and on a CPU, parallel requests would only share the same cores).
    Drawing attention figures holds another, since matplotlib does not promise thread safety; it does not hold up
    captioning. An ensemble has no attention maps: its members look at different memory tokens."""

    def __init__(self, model, tokenizer: Tokenizer, image_size: int, device: torch.device,
                 attention_layer: int = -1, checkpoint: str = "", defaults: RankingDefaults | None = None):
        self.model, self.tokenizer, self.image_size, self.device = model.eval(), tokenizer, image_size, device
        self.members = list(model.members) if isinstance(model, Ensemble) else [model]
        self.draws_attention = len(self.members) == 1
        self.attention_layer = visualize.check_attention_layer(model, attention_layer) if self.draws_attention \
            else None
        self.checkpoint = checkpoint
        self.defaults = defaults or RankingDefaults()
        self.lock = threading.Lock()
        self.drawing = threading.Lock()
        self.placement = visualize.cell_placement(model, image_size) if self.draws_attention else None

    def describe(self) -> dict:
        """decoder and bridge: the model's, or the members' joined by "+" for an ensemble."""
        return {"checkpoint": self.checkpoint, "models": len(self.members),
                "decoder": "+".join(member.cfg.decoder for member in self.members),
                "bridge": "+".join(member.cfg.bridge for member in self.members),
                "image_size": self.image_size, "vocab_size": self.tokenizer.vocab_size,
                "attention": self.draws_attention, "attention_layer": self.attention_layer,
                "max_beam_size": MAX_BEAM_SIZE, "length_penalty": self.defaults.length_penalty,
                "no_repeat_ngram": self.defaults.no_repeat_ngram}

    def caption(self, image: Image.Image, beam_size: int = 1, num_captions: int = 1, attention: bool = False,
                length_penalty: float | None = None, no_repeat_ngram: int | None = None) -> dict:
        """-> {"captions": [{"caption", "score"}, ...] best first [, "attention": {...} for the best one]} and
        the settings used. length_penalty and no_repeat_ngram: None takes the server's default."""
        if attention and not self.draws_attention:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"attention maps are one model's, and this server decodes "
                               f"an ensemble of {len(self.members)} checkpoints; ask without attention")
        length_penalty = self.defaults.length_penalty if length_penalty is None else length_penalty
        no_repeat_ngram = self.defaults.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram
        options = DecodeOptions(beam_size=beam_size, num_return=num_captions, length_penalty=length_penalty,
                                no_repeat_ngram=no_repeat_ngram,
                                attention_layer=self.attention_layer if attention else None)
        pixels = resize_to_tensor(image, self.image_size)[None]  # (1, 3, S, S) uint8
        with self.lock:
            hypotheses = decode_images(self.model, pixels, self.device, options)[0]
        result = {"beam_size": beam_size, "length_penalty": length_penalty, "no_repeat_ngram": no_repeat_ngram,
                  "captions": [{"caption": self.tokenizer.decode(h.tokens), "score": round(h.score, 4)}
                               for h in hypotheses]}
        if attention:
            best = hypotheses[0]
            words = visualize.hypothesis_attention(self.tokenizer, best)
            with self.drawing:
                png = visualize.figure_png(visualize.attention_figure(image, result["captions"][0]["caption"], words,
                                                                      self.placement))
            result["attention"] = {"layer": self.attention_layer, "words": words.words,
                                   "grid": list(words.maps.shape[1:]),
                                   "centres": [round(c, 4) for c in self.placement.centres],
                                   "maps": words.maps.astype(float).round(4).tolist(),
                                   "figure": "data:image/png;base64," + base64.b64encode(png).decode("ascii")}
        return result


def read_image(data: bytes, name: str, limits: Limits) -> Image.Image:
    """Upload bytes -> RGB image, or a RequestError: 415 not an image, 413 too many pixels, 400 broken."""
    if not data:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the uploaded file '{name}' is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"'{name}' is too large to decode: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"'{name}' is not an image this server can read (JPEG, PNG, GIF, BMP or WebP)") from None
    if width * height > limits.max_pixels:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"'{name}' is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    try:
        return load_image_bytes(data, name)
    except ImageReadError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None


def _number_field(form, name: str, default, low, high, kind=int):
    """The form field `name` as a `kind` (int or float) within low..high; `default` when absent or blank."""
    part = form.get(name)
    if part is None or not part.data.strip():
        return default
    try:
        value = kind(part.data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be {'an integer' if kind is int else 'a number'}, "
                           f"got {part.data[:20]!r}") from None
    if not low <= value <= high:  # also refuses nan
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return value


def caption_request(service: CaptionService, body: bytes, content_type: str, limits: Limits) -> dict:
    """The whole of POST /api/caption once the body is read: form -> options -> image -> captions."""
    try:
        form = parse_form(body, content_type)
    except MultipartError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{exc} (send multipart/form-data with a file field 'image')") \
            from None
    part = form.get("image")
    if part is None:
        raise RequestError(HTTPStatus.BAD_REQUEST, "no file field 'image' in the form")
    beam_size = _number_field(form, "beam_size", 1, 1, MAX_BEAM_SIZE)
    num_captions = _number_field(form, "num_captions", 1, 1, beam_size)
    length_penalty = _number_field(form, "length_penalty", None, 0.0, MAX_LENGTH_PENALTY, float)
    no_repeat_ngram = _number_field(form, "no_repeat_ngram", None, 0, MAX_NO_REPEAT_NGRAM)
    attention = form["attention"].data.strip() in (b"1", b"true", b"on") if "attention" in form else False
    name = part.filename or "image"
    image = read_image(part.data, name, limits)
    result = service.caption(image, beam_size, num_captions, attention, length_penalty, no_repeat_ngram)
    return {"image": {"name": name, "width": image.width, "height": image.height}, **result}


class CaptionHandler(BaseHTTPRequestHandler):
    server: "CaptionServer"
    server_version = "captioner"
    timeout = 60  # seconds a client may stall while sending: an idle connection does not hold a thread forever

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/health":
            limits = self.server.limits
            self._json(HTTPStatus.OK, {"status": "ok", **self.server.service.describe(),
                                       "max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels})
        elif path == "/api/caption":
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST with multipart/form-data"},
                       {"Allow": "POST"})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path != "/api/caption":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {path}"})
            return
        try:
            body = self._read_body()
            result = caption_request(self.server.service, body, self.headers.get("Content-Type", ""),
                                     self.server.limits)
        except RequestError as exc:
            log.info("%s %s -> %d: %s", self.command, path, exc.status, exc.message)
            self._json(exc.status, {"error": exc.message})
            return
        except (TimeoutError, ConnectionError) as exc:  # the client stalled or went away: nobody to answer
            log.info("%s %s: connection dropped (%s)", self.command, path, exc)
            self.close_connection = True
            return
        except Exception as exc:  # a bug, not the client's fault: say so, keep serving
            log.exception("captioning failed")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(exc).__name__}: {exc}"})
            return
        self._json(HTTPStatus.OK, result)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required (chunked uploads are not accepted)")
        try:
            size = int(length)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}") from None
        limit = self.server.limits.max_upload_bytes
        if size > limit:
            self._discard(size, limit)
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"upload of {size} bytes exceeds the limit of {limit} bytes")
        if size < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
        body = self.rfile.read(size)
        if len(body) < size:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"request body ended after {len(body)} of {size} bytes")
        return body

    def _discard(self, size: int, limit: int) -> None:
        """Read and drop a moderately oversized body, so the client, still sending, sees the 413 rather than a
        reset connection; a body far over the limit is not worth reading (the connection closes instead)."""
        if size > 4 * limit:
            return
        remaining = size
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)

    def _json(self, status: HTTPStatus, payload: dict, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json", headers)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)


class CaptionServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: bursts of clients wait in the kernel queue instead of failing

    def __init__(self, address: tuple[str, int], service: CaptionService, limits: Limits):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.service, self.limits, self.page = service, limits, PAGE.read_bytes()
        super().__init__(address, CaptionHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_server(service: CaptionService, host: str = "127.0.0.1", port: int = 8000,
                limits: Limits | None = None) -> CaptionServer:
    """Bind (port 0 picks a free port; `server.url` says which) without serving yet."""
    try:
        return CaptionServer((host, port), service, limits or Limits())
    except OSError as exc:
        raise CaptionerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run_from_args(args) -> int:
    from .ensemble import load_models
    from .training import resolve_device

    if args.max_upload_mb <= 0 or args.max_pixels <= 0:
        raise CaptionerError("--max-upload-mb and --max-pixels must be positive")
    if args.max_pixels > MAX_IMAGE_PIXELS:  # every image is decoded by the same guarded loader as training's
        raise CaptionerError(f"--max-pixels {args.max_pixels} is above {MAX_IMAGE_PIXELS}, the most pixels this "
                             "project decodes in any image (data/images.py)")
    if len(args.checkpoint) > 1 and args.attention_layer is not None:
        raise CaptionerError(f"--attention-layer: an ensemble of {len(args.checkpoint)} checkpoints has no attention "
                             "maps to show (its members attend to different memory tokens)")
    defaults = RankingDefaults(args.length_penalty, args.no_repeat_ngram)
    device = resolve_device(args.device)
    model, tokenizer, cfg = load_models(args.checkpoint, device)
    layer = -1 if args.attention_layer is None else args.attention_layer
    service = CaptionService(model, tokenizer, cfg.data.image_size, device, layer,
                             "+".join(args.checkpoint), defaults)
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels)
    server = make_server(service, args.host, args.port, limits)
    if args.host not in LOOPBACK_HOSTS:
        print(f"captioner serve: warning: listening on {args.host}; anyone who can reach it can use the model "
              "(there is no authentication)", file=sys.stderr)
    print(f"captioner serve: {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, action="append",
                   help="a checkpoint (RUN/best.pt or an exported file); repeated, one ensemble that averages their "
                        "next-token probabilities (same vocabulary and image size; no attention maps)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the URL is printed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--attention-layer", type=int,
                   help="Transformer decoder layer whose cross-attention the page shows (default -1, the last; "
                        "one checkpoint only)")
    p.add_argument("--length-penalty", type=float, default=0.0,
                   help="GNMT alpha ranking the beams of requests that do not send length_penalty (0 = raw)")
    p.add_argument("--no-repeat-ngram", type=int, default=0,
                   help="n-gram size no caption repeats, for requests that do not send no_repeat_ngram (0 = off)")
    p.add_argument("--max-upload-mb", type=float, default=Limits.max_upload_bytes / 2**20,
                   help="largest request body accepted, in MiB (default: %(default)g)")
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels,
                   help=f"largest image accepted, width x height (default: %(default)d, at most {MAX_IMAGE_PIXELS})")

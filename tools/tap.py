"""`hexiao tap`: the receipt tap's key (`keygen`), its offline tools (replay, render, verify,
bench), and the live
tap (`serve`: options -> a [tap] config -> hostd/tap/service.py's TapService, the same tap
hexiao-hostd runs with [tap] enabled) with its latency benchmark (`proxybench`,
tools/bench/tap_proxy.py).

`replay` runs a capture through the same streaming injector the proxy uses, fed in chunks; `render`
draws what a stream prints; `verify` checks a signed per-receipt token. Verification lives here
because the tap mints the tokens with its key and a support engineer finds every receipt-tap
tool in one place; `hexiao receipt verify` is the same command under the name a merchant's
developer looks for.

Exit codes: 0 done; 1 keygen: the file exists (never overwritten); replay: some receipt lost
its QR to an error or the stream failed open (the output is still the safe, unchanged print);
verify: the token does not verify or the receipt does not match; serve: cannot listen or open
the serial POS port; 2 usage errors (bad option, profile, or a key file that is unreadable, not
a key, or readable by others).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from hexiao.hostd.tap import inject, keys
from hexiao.hostd.tap.escpos import Parser
from hexiao.hostd.tap.inject import Content, Injector, PrinterProfile, QRStyle
from hexiao.hostd.tap.receipt import DEFAULT_TOTALS
from hexiao.hostd.tap.service import TapError, TapService

BENCH_TARGET_MBPS = 20.0  # DESIGN.md "Quality bars": the parser on receipts with images


def read_key(path: str) -> bytes:
    """A tap key file (hostd/tap/keys.py: hex or raw bytes, 0600); a usage error if unusable."""
    try:
        return keys.read_key(path)
    except keys.KeyFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--key-file") from None


def _profile(spec: str, overrides: dict[str, Any]) -> PrinterProfile:
    import dataclasses

    try:
        base = inject.load_profile(spec)
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    except (ValueError, TypeError, OSError) as exc:
        raise click.BadParameter(str(exc), param_hint="--profile") from exc


def _when(value: str | None) -> float:
    if value is None:
        return time.time()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError as exc:
        raise click.BadParameter("use epoch seconds or ISO 8601, e.g. 2024-05-01T12:00:00+08:00",
                                 param_hint="--time") from exc


def _totals(patterns: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    if not patterns:
        return DEFAULT_TOTALS
    out = []
    for p in patterns:
        name, sep, rx = p.partition("=")
        if not sep or not name or not rx:
            raise click.BadParameter("use NAME=REGEX, e.g. 应付=应\\s*付",
                                     param_hint="--total-pattern")
        out.append((name, rx))
    return tuple(out)


def profile_options(fn: Any) -> Any:
    for opt in reversed((
        click.option("--profile", "profile_spec", default="generic-80", show_default=True,
                     help=f"printer profile: {', '.join(inject.PROFILES)}, or a JSON file"),
        click.option("--qr", type=click.Choice(["native", "raster"]), help="override: QR mode"),
        click.option("--raster", type=click.Choice(["gsv0", "escstar"]),
                     help="override: raster command for printers without GS v 0"),
        click.option("--width", type=int, help="override: printable dots per line"),
        click.option("--cutter/--no-cutter", default=None, help="override: printer has a cutter"),
    )):
        fn = opt(fn)
    return fn


def _overrides(qr: str | None, raster: str | None, width: int | None,
               cutter: bool | None) -> dict[str, Any]:
    return {"qr": qr, "raster": raster, "width": width, "cutter": cutter}


def _print_receipts(inj: Injector, as_json: bool) -> None:
    for rc in inj.receipts:
        if as_json:
            click.echo(json.dumps(rc.as_json(), ensure_ascii=False))
            continue
        total = "no total found" if rc.total is None else f"total {rc.total}"
        state = f"QR: {rc.content}" if rc.injected else f"no QR ({rc.skipped})"
        click.echo(f"receipt {rc.index} (ended by {rc.end}): {len(rc.lines)} lines, {total}, "
                   f"{state}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Receipt tap: replay a print capture through the QR injector, render it, verify tokens."""


@main.command()
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="the key file to create (0600; never overwritten)")
def keygen(out_path: str) -> None:
    """Create a tap key: 32 random bytes as hex in a new 0600 file, for [tap] key_file."""
    try:
        keys.new_key_file(out_path)
    except FileExistsError:
        raise click.ClickException(
            f"{out_path} exists: a tap key is never overwritten (tokens it signed would stop "
            f"verifying); choose another path") from None
    except OSError as exc:
        raise click.ClickException(f"cannot create {out_path}: {exc.strerror}") from None
    click.echo(f"tap key written to {out_path} (0600); set [tap] key_file = \"{out_path}\" "
               f"and keep a copy where the receipt tokens are verified")


@main.command()
@click.argument("capture", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="where to write the stream the printer would get")
@profile_options
@click.option("--content", default="{token}", show_default=True,
              help="QR content template; fields: " + ", ".join(sorted(inject.FIELDS)))
@click.option("--caption", default="", help="a text line under the QR (a template too)")
@click.option("--module", type=click.IntRange(1, 16), default=6, show_default=True,
              help="dots per QR module")
@click.option("--align", type=click.Choice(["left", "center", "right"]), default="center",
              show_default=True)
@click.option("--ec", type=click.Choice(["L", "M", "Q", "H"]), default="M", show_default=True)
@click.option("--lane", default="lane-1", show_default=True, help="lane id signed into tokens")
@click.option("--key-file", type=click.Path(dir_okay=False), help="tap key (for {token})")
@click.option("--time", "when", help="receipt time for tokens (epoch or ISO 8601; default now)")
@click.option("--existing-qr", type=click.Choice(["inject", "skip"]), default="inject",
              show_default=True, help="receipts that print their own QR: add ours, or leave them")
@click.option("--total-pattern", multiple=True,
              help="NAME=REGEX label of a total line (repeat; replaces the defaults "
                   + "/".join(n for n, _ in DEFAULT_TOTALS) + ")")
@click.option("--chunk", type=click.IntRange(1), default=4096, show_default=True,
              help="feed the injector this many bytes at a time, as a connection would")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per receipt, then a summary")
def replay(capture: str, out_path: str, profile_spec: str, qr: str | None, raster: str | None,
           width: int | None, cutter: bool | None, content: str, caption: str, module: int,
           align: str, ec: str, lane: str, key_file: str | None, when: str | None,
           existing_qr: str, total_pattern: tuple[str, ...], chunk: int, as_json: bool) -> None:
    """Run CAPTURE (a POS -> printer byte capture, '-' for stdin) through the injector."""
    profile = _profile(profile_spec, _overrides(qr, raster, width, cutter))
    key = read_key(key_file) if key_file else None
    try:
        inj = Injector(profile, QRStyle(module, align, ec, caption), Content(content, lane, key),
                       _totals(total_pattern), existing_qr)
    except ValueError as exc:
        hint = " (give --key-file, or a --content without {token})" if "key" in str(exc) else ""
        raise click.UsageError(f"{exc}{hint}") from exc
    data = sys.stdin.buffer.read() if capture == "-" else Path(capture).read_bytes()
    now = _when(when)
    out = bytearray()
    with click.progressbar(length=len(data), label="replaying", file=sys.stderr,
                           hidden=len(data) < (8 << 20) or as_json) as bar:
        for i in range(0, len(data), chunk):
            out += inj.feed(data[i:i + chunk], now)
            bar.update(min(chunk, len(data) - i))
    out += inj.close(now)
    Path(out_path).write_bytes(out)
    _print_receipts(inj, as_json)
    summary = {"bytes_in": len(data), "bytes_out": len(out), **inj.counters,
               "injections": inj.injections, "errors": inj.errors}
    if as_json:
        click.echo(json.dumps({"summary": summary}, ensure_ascii=False))
    else:
        click.echo(f"{len(inj.receipts)} receipts, {inj.counters['injected']} QR blocks added; "
                   f"{len(data)} -> {len(out)} bytes written to {out_path}")
        for err in inj.errors:
            click.echo(f"Error: {err}", err=True)
    if inj.counters["errors"] or inj.counters["failopen"]:
        sys.exit(1)


@main.command()
@click.argument("capture", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--png", "png", required=True, type=click.Path(dir_okay=False),
              help="where to write the picture")
@profile_options
@click.option("--font", type=click.Path(exists=True, dir_okay=False),
              help="a TrueType/OpenType font with Chinese glyphs (default: first one found)")
@click.option("--json", "as_json", is_flag=True, help="receipts as JSON lines")
def render(capture: str, png: str, profile_spec: str, qr: str | None, raster: str | None,
           width: int | None, cutter: bool | None, font: str | None, as_json: bool) -> None:
    """Draw what CAPTURE would print (text, images, barcodes, QR) into a PNG."""
    from hexiao.hostd.tap import render as escpos_render

    profile = _profile(profile_spec, _overrides(qr, raster, width, cutter))
    data = sys.stdin.buffer.read() if capture == "-" else Path(capture).read_bytes()
    found = escpos_render.find_font(font)
    if not font and (found is None or "DejaVu" in found):
        click.echo("note: no font with Chinese glyphs found; Chinese text draws as boxes "
                   "(give --font PATH, e.g. a Noto Sans CJK or WenQuanYi file)", err=True)
    img = escpos_render.render(data, profile.width, profile.encoding, profile.kanji_default, font)
    img.save(png)
    dry = Injector(profile, enabled=False)
    dry.feed(data, 0.0)
    dry.close(0.0)
    _print_receipts(dry, as_json)
    if not as_json:
        click.echo(f"{img.width}x{img.height} picture written to {png}")


def _token_candidates(text: str) -> list[str]:
    # a bare token, or a scanned URL that carries one as a path segment or query value
    parts = [text]
    for sep in "/?&=#":
        parts = [q for p in parts for q in p.split(sep)]
    return [text] + [p for p in parts if len(p) >= 40 and p != text]


@main.command()
@click.argument("token")
@click.option("--key-file", "key_files", multiple=True, required=True,
              type=click.Path(dir_okay=False), help="tap key (repeat for old keys)")
@profile_options
@click.option("--receipt", "receipt_capture", type=click.Path(exists=True, dir_okay=False),
              help="a POS-side capture: find the receipt whose digest the token signs")
@click.option("--json", "as_json", is_flag=True)
def verify(token: str, key_files: tuple[str, ...], profile_spec: str, qr: str | None,
           raster: str | None, width: int | None, cutter: bool | None,
           receipt_capture: str | None, as_json: bool) -> None:
    """Check a signed per-receipt TOKEN (or the URL it was scanned from)."""
    keys = [read_key(k) for k in key_files]
    info, error = None, "no token found"
    for candidate in _token_candidates(token):
        try:
            info = inject.verify_token(keys, candidate)
            break
        except inject.TokenError as exc:
            error = str(exc)
    result: dict[str, Any] = {"valid": info is not None}
    if info is None:
        result["error"] = error
    else:
        result.update(lane=info.lane, time=info.time, total=None if info.total is None
                      else str(info.total), digest=info.digest,
                      time_utc=f"{datetime.fromtimestamp(info.time, UTC):%Y-%m-%dT%H:%M:%SZ}")
    if info is not None and receipt_capture:
        dry = Injector(_profile(profile_spec, _overrides(qr, raster, width, cutter)),
                       enabled=False)
        dry.feed(Path(receipt_capture).read_bytes(), 0.0)
        dry.close(0.0)
        match = [rc for rc in dry.receipts if rc.digest.startswith(info.digest)]
        result["receipt"] = match[0].index if match else None
        if match:
            result["lines"] = match[0].lines
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
    elif info is None:
        click.echo(f"INVALID: {error}")
    else:
        total = "none" if info.total is None else str(info.total)
        click.echo(f"valid: lane {info.lane}, {result['time_utc']}, total {total}, "
                   f"receipt digest {info.digest}")
        if receipt_capture:
            click.echo(f"matches receipt {result['receipt']} in {receipt_capture}"
                       if result["receipt"] is not None else
                       f"no receipt in {receipt_capture} has this digest")
    ok = info is not None and (not receipt_capture or result.get("receipt") is not None)
    sys.exit(0 if ok else 1)


# ---- benchmark --------------------------------------------------------------------------------

def bench_receipt(rng: random.Random, logo_rows: int = 400) -> bytes:
    """A receipt with a large raster logo (data full of GS V / ESC @ look-alikes), an ESC *
    band, GS ( L graphics, 30 lines of GB18030 text, a barcode, a native QR and a cut."""
    width_bytes = 72  # 576 dots
    logo = bytes(rng.choice(b"\x1dV\x00\x1b@\x00\xff\x55\xaa") for _ in range(width_bytes * 64))
    logo = (logo * (logo_rows // 64 + 1))[:width_bytes * logo_rows]
    parts = [b"\x1b@\x1ba\x01", b"\x1dv0\x00" + width_bytes.to_bytes(2, "little")
             + logo_rows.to_bytes(2, "little") + logo,
             b"\x1b*\x21" + (576).to_bytes(2, "little") + logo[:576 * 3] + b"\n"]
    g = b"0p0\x01\x01" + b"1" + (576).to_bytes(2, "little") + (96).to_bytes(2, "little") \
        + logo[:72 * 96]
    parts.append(b"\x1d(L" + (len(g)).to_bytes(2, "little") + g + b"\x1d(L\x02\x0002")
    parts.append(b"\x1ba\x00")
    for i in range(30):
        parts.append(f"商品{i:02d} 可口可乐 330ml x{i % 3 + 1}      ¥{i * 1.5 + 3:.2f}\n"
                     .encode("gb18030"))
    parts.append("合计: ¥128.50\n实收: ¥150.00\n".encode("gb18030"))
    parts.append(b"\x1dh\x50\x1dw\x02\x1dH\x02\x1dk\x02690123456789\x00")
    parts.append(b"\x1d(k\x04\x001A2\x00\x1d(k\x03\x001C\x04\x1d(k\x14\x001P0https://pos.example"
                 + b"\x1d(k\x03\x001Q0")
    parts.append(b"\x1bd\x05\x1dVA\x10")
    return b"".join(parts)


def _best_mbps(fn: Any, data: bytes, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(data)
        best = min(best, time.perf_counter() - t0)
    return len(data) / best / 1e6


def _parse_all(data: bytes, chunk: int = 65536) -> None:
    p = Parser()
    for i in range(0, len(data), chunk):
        p.feed(data[i:i + chunk])
    p.close()


def _inject_all(data: bytes, chunk: int = 65536) -> None:
    inj = Injector(PrinterProfile(), QRStyle(), Content("{token}", "lane-1", b"k" * 32))
    for i in range(0, len(data), chunk):
        inj.feed(data[i:i + chunk], 1.7e9)
    inj.close(1.7e9)


def _block_ms(profile: PrinterProfile, rounds: int) -> float:
    # one QR block for a typical signed URL: what injection adds per receipt
    from hexiao.hostd.tap.receipt import PrinterState

    content = "https://hexiao.example/r/" + "A" * 62
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        inject.qr_block(profile, QRStyle(), content, "", PrinterState())
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@main.command()
@click.option("--mb", type=click.FloatRange(0.1), default=32.0, show_default=True,
              help="stream size per round")
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench(mb: float, rounds: int, as_json: bool) -> None:
    """Parser (and whole injector) throughput on receipts with large raster images."""
    rng = random.Random(6)
    one = bench_receipt(rng)
    data = one * max(1, math.ceil(mb * 1e6 / len(one)))
    text_only = ("商品 可口可乐 330ml x2      ¥3.00\n".encode("gb18030") * 40 + b"\x1dV\x00")
    text_data = text_only * max(1, int(mb * 1e6 / len(text_only) / 8))
    # the figure only counts if the parse is right: lossless, one real cut per receipt
    from hexiao.hostd.tap.escpos import parse

    events = parse(data)
    if b"".join(e.raw for e in events) != data or sum(
            getattr(e, "kind", "") == "cut" for e in events) != len(data) // len(one):
        raise click.ClickException("the parser mis-framed the benchmark stream")
    result = {
        "receipt_bytes": len(one), "stream_bytes": len(data), "rounds": rounds,
        "parser_mbps": round(_best_mbps(_parse_all, data, rounds), 1),
        "injector_mbps": round(_best_mbps(_inject_all, data, rounds), 1),
        "parser_text_only_mbps": round(_best_mbps(_parse_all, text_data, rounds), 1),
        "native_block_ms": round(_block_ms(inject.PROFILES["generic-80"], rounds * 4), 3),
        "raster_block_ms": round(_block_ms(inject.PROFILES["raster-80"], rounds * 4), 2),
        "target_mbps": BENCH_TARGET_MBPS, "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    if as_json:
        click.echo(json.dumps(result))
        return
    verdict = "meets" if result["parser_mbps"] >= BENCH_TARGET_MBPS else "MISSES"
    click.echo(f"parser: {result['parser_mbps']} MB/s on {len(one)}-byte receipts with images "
               f"({verdict} the {BENCH_TARGET_MBPS:.0f} MB/s bar)")
    click.echo(f"injector (parse + assemble + QR + sign): {result['injector_mbps']} MB/s")
    click.echo(f"parser on text-only receipts: {result['parser_text_only_mbps']} MB/s")
    click.echo(f"one QR block: native {result['native_block_ms']} ms, raster (segno) "
               f"{result['raster_block_ms']} ms")


@main.command()
@click.option("--listen", default="127.0.0.1:9100", show_default=True,
              help="where the POS prints: HOST:PORT (port 0: any free port), "
                   "serial:DEVICE[@BAUD] (a serial port the POS writes to), or "
                   "pty[:LINK] (a new pseudo-terminal, optionally symlinked at LINK)")
@click.option("--printer", "printer_spec", required=True,
              help="the printer: tcp:HOST:PORT, file:PATH, serial:DEV[@BAUD], usb:VID:PID[:SERIAL]")
@profile_options
@click.option("--content", default="{token}", show_default=True,
              help="QR content template; fields: " + ", ".join(sorted(inject.FIELDS)))
@click.option("--caption", default="", help="a text line under the QR (a template too)")
@click.option("--lane", default="lane-1", show_default=True, help="lane id signed into tokens")
@click.option("--key-file", type=click.Path(dir_okay=False), help="tap key (for {token})")
@click.option("--existing-qr", type=click.Choice(["inject", "skip"]), default="inject",
              show_default=True)
@click.option("--idle-timeout", type=click.FloatRange(0.01), default=2.0, show_default=True,
              help="seconds of POS silence (at a command boundary) that end a job")
@click.option("--connect-timeout", type=click.FloatRange(0), default=5.0, show_default=True,
              help="seconds to keep retrying a printer that refuses, before failing the job")
@click.option("--stall-timeout", type=click.FloatRange(0.01), default=30.0, show_default=True,
              help="seconds of POS silence in the middle of a command before what it sent is "
                   "passed on as it is and the connection is closed")
@click.option("--json", "as_json", is_flag=True, help="one JSON line per finished connection")
def serve(listen: str, printer_spec: str, profile_spec: str, qr: str | None, raster: str | None,
          width: int | None, cutter: bool | None, content: str, caption: str, lane: str,
          key_file: str | None, existing_qr: str, idle_timeout: float, connect_timeout: float,
          stall_timeout: float, as_json: bool) -> None:
    """Run the tap: POS -> this proxy (QR injected, fail-open) -> the printer, until SIGTERM.

    The same tap hexiao-hostd runs with [tap] enabled (hostd/tap/service.py)."""
    import queue
    import signal
    import threading

    from hexiao.hostd.config.types import Tap
    from hexiao.hostd.tap.proxy import ConnRecord

    cfg = Tap(enabled=True, listen=listen, printer=printer_spec, profile=profile_spec,
              content=content, caption=caption, lane=lane,
              key_file=Path(key_file) if key_file else None, existing_qr=existing_qr,
              idle_timeout_s=idle_timeout, connect_timeout_s=connect_timeout,
              stall_timeout_s=stall_timeout)
    done: queue.Queue[ConnRecord] = queue.Queue()
    tap = TapService(cfg, on_finish=done.put,
                     profile=_profile(profile_spec, _overrides(qr, raster, width, cutter)))
    try:
        tap.start()
    except TapError as exc:
        raise _tap_error(exc) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    printer = tap.state()["printer"]["target"]
    click.echo(json.dumps({"listening": tap.where, "printer": printer}) if as_json else
               f"listening on {tap.where}, printing to {printer} (Ctrl-C to stop)")
    try:
        while not stop.is_set():
            try:
                rec = done.get(timeout=0.2)
            except queue.Empty:
                continue
            click.echo(json.dumps(rec.as_json(), ensure_ascii=False) if as_json else
                       f"{rec.peer}: {rec.end}, {rec.bytes_in} -> {rec.bytes_out} bytes, "
                       f"{rec.counters['injected']} QR" + "".join(
                           f"; error: {e}" for e in rec.errors))
    except KeyboardInterrupt:
        pass
    tap.stop()
    summary = dict(tap.proxy.counters) if tap.proxy is not None else {}
    click.echo(json.dumps({"summary": summary}) if as_json else
               "stopped: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                       for k, v in sorted(summary.items())))


_OPTION = {"listen": "--listen", "printer": "--printer", "profile": "--profile",
           "key_file": "--key-file"}


def _tap_error(exc: TapError) -> click.ClickException:
    """A TapError as the CLI reports it: a bad option is a usage error (exit 2), the machine's
    refusal (a port taken, no such serial port) an error (exit 1)."""
    msg = str(exc)
    if exc.key is None:
        return click.ClickException(msg)
    if exc.key == "key_file" and "{token}" in msg:  # no key given, not a bad key file
        return click.UsageError(f"{msg} (give --key-file, or a --content without {{token}})")
    if exc.key in _OPTION:
        return click.BadParameter(msg, param_hint=_OPTION[exc.key])
    return click.UsageError(msg)


@main.command()
@click.option("--jobs", type=click.IntRange(10, 5000), default=200, show_default=True)
@click.option("--profile", "profile_spec", type=click.Choice(list(inject.PROFILES)),
              default="generic-80", show_default=True, help="native or raster QR, etc.")
@click.option("--logo-rows", type=click.IntRange(0, 2000), default=0, show_default=True,
              help="put a raster logo this many dots high on each receipt")
@click.option("--json", "as_json", is_flag=True)
def proxybench(jobs: int, profile_spec: str, logo_rows: int, as_json: bool) -> None:
    """The proxy's added latency per job on loopback (p50/p99), POS connect to printer cut."""
    from hexiao.tools.bench import tap_proxy as tap_bench

    result = tap_bench.proxy_latency(jobs, profile_spec,
                                     tap_bench.typical_receipt(logo_rows=logo_rows))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{jobs} jobs of {result['receipt_bytes']} bytes, profile {profile_spec}: "
               f"direct p50 {result['direct_p50_ms']} ms / p99 {result['direct_p99_ms']} ms, "
               f"through the tap p50 {result['proxied_p50_ms']} ms / p99 "
               f"{result['proxied_p99_ms']} ms")
    click.echo(f"added by the tap: p50 {result['added_p50_ms']} ms, "
               f"p99 {result['added_p99_ms']} ms")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def receipt_main() -> None:
    """Per-receipt tokens, for whoever handles the customer's scan of a receipt's QR."""


receipt_main.add_command(verify)  # `hexiao receipt verify` is `hexiao tap verify`

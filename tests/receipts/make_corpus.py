"""Build the receipt corpus: real-looking POS print jobs, and what each one contains.

Run `python tests/receipts/make_corpus.py` to (re)write the `*.bin` files and `corpus.json`;
test_inject.py checks the committed files are exactly what this script builds. The POS side is
python-escpos (its `Dummy` printer gives the bytes), as a real POS driver would produce them;
hand-built bytes cover what it cannot send (GS 8 L, FS p, ESC i, Chinese mode, status requests).
Expectations are written here from what each job was built with, never from our parser.

Boundary rule for printers without a cutter (documented in hostd/tap/receipt.py): ESC @ after
printed content, or the end of the job, ends a receipt.
"""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from escpos.printer import Dummy
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
LOOKALIKES = (b"\x1dV\x00", b"\x1dVA\x10", b"\x1b@", b"\x1bi", b"\x10\x04\x01", b"\x1d(k")


def gb(text: str) -> bytes:
    return text.encode("gb18030")


def pos() -> Dummy:
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        return Dummy()


def raster_image(width: int, rows: int) -> Image.Image:
    """An image whose raster rows (GS v 0, GS ( L) are full of cut / init look-alikes."""
    row = b"".join(LOOKALIKES)
    row = (row * (width // 8 // len(row) + 1))[:width // 8]
    data = b"".join(row[i % len(row):] + row[:i % len(row)] for i in range(rows))
    return Image.frombytes("1", (width, rows), data, "raw", "1;I")


def column_image(width: int) -> Image.Image:
    """An image whose 24-dot columns (ESC * m=33) read 1D 56 00, 1B 40 0A, 1D 56 41 ..."""
    patterns = [b"\x1dV\x00", b"\x1b@\n", b"\x1dVA", b"\x10\x04\x02", b"\x1bi\x00"]
    img = Image.new("1", (width, 24), 1)
    for x in range(width):
        bits = int.from_bytes(patterns[x % len(patterns)], "big")
        for y in range(24):
            if bits >> (23 - y) & 1:
                img.putpixel((x, y), 0)
    return img


def logo(width: int = 256, height: int = 64) -> Image.Image:
    img = Image.new("1", (width, height), 1)
    d = ImageDraw.Draw(img)
    d.rectangle((2, 2, width - 3, height - 3), outline=0, width=3)
    d.ellipse((width // 2 - 24, 8, width // 2 + 24, height - 8), fill=0)
    return img


def items(p: Dummy, rows: list[tuple[str, str]]) -> None:
    p._raw(b"\x1ba\x00")
    for name, price in rows:
        p._raw(gb(f"{name:<16}{price:>10}\n"))


def image(p: Dummy, img: Image.Image, impl: str) -> None:
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        p.image(img, impl=impl, center=False)


def build() -> dict[str, tuple[bytes, dict[str, Any]]]:
    jobs: dict[str, tuple[bytes, dict[str, Any]]] = {}

    def job(name: str, data: bytes, receipts: list[dict[str, Any]], cuts: int,
            note: str, **extra: Any) -> None:
        jobs[name] = (data, {"note": note, "receipts": receipts, "cuts": cuts, **extra})

    # 1. a Chinese supermarket receipt, GB18030, feed-and-cut (GS V 66 n)
    p = pos()
    p.hw("INIT")
    p.set(align="center", bold=True, double_height=True)
    p._raw(gb("好又多超市 (人民路店)\n"))
    p.set(align="center", bold=False, normal_textsize=True)
    p._raw(gb("收银员: 003  机号: 02\n2024-05-01 12:30:05  单号: 000128\n"))
    items(p, [("可口可乐 330ml", "3.50"), ("康师傅红烧牛肉面", "4.50"), ("金龙鱼大米 5kg", "45.90"),
              ("蒙牛纯牛奶 x2", "74.60")])
    p._raw(gb("--------------------------\n合计:  4件        ¥128.50\n实收:  现金      ¥150.00\n"
              "找零:             ¥21.50\n"))
    p.set(align="center")
    p._raw(gb("谢谢惠顾，欢迎再次光临！\n"))
    p._raw(b"\x1bd\x04\x1dVB\x00")
    job("cn_supermarket.bin", p.output, [{"total": "128.50", "has_qr": False, "contains": [
        "好又多超市 (人民路店)", "合计:  4件        ¥128.50", "谢谢惠顾，欢迎再次光临！"]}],
        cuts=1, note="GB18030 receipt, ESC ! sizes, GS V 66 0")

    # 2. raster logo (GS v 0) whose rows are full of GS V / ESC @ look-alikes, full cut GS V 0
    p = pos()
    p.hw("INIT")
    p.set(align="center")
    image(p, raster_image(384, 48), "bitImageRaster")
    p._raw(gb("星巴克咖啡 国贸店\n"))
    items(p, [("大杯拿铁", "33.00"), ("蓝莓玛芬", "18.00")])
    p._raw(gb("应收 51.00\n实收 51.00 微信支付\n"))
    p._raw(b"\n\n\n\n\x1dV\x00")
    job("logo_gs_v0.bin", p.output, [{"total": "51.00", "has_qr": False,
        "contains": ["星巴克咖啡 国贸店"]}], cuts=1, note="GS v 0 logo with look-alike data")

    # 3. ESC * bit image columns that read as GS V / ESC @, partial cut GS V 1
    p = pos()
    p.hw("INIT")
    image(p, column_image(240), "bitImageColumn")
    image(p, logo(), "bitImageColumn")
    p._raw(b"Corner Cafe\nFlat white        4.20\nTotal             4.20\n")
    p._raw(b"\x1bd\x03\x1dV\x01")
    job("logo_esc_star.bin", p.output, [{"total": "4.20", "has_qr": False,
        "contains": ["Corner Cafe"]}], cuts=1, note="ESC * m=33 columns that look like cuts")

    # 4. GS ( L graphics (python-escpos) and the 32-bit GS 8 L form, cut GS V 48
    p = pos()
    p.hw("INIT")
    image(p, raster_image(256, 40), "graphics")
    g = b"0p0\x01\x011" + (128).to_bytes(2, "little") + (16).to_bytes(2, "little") \
        + raster_image(128, 16).tobytes()
    p._raw(b"\x1d8L" + len(g).to_bytes(4, "little") + g + b"\x1d8L\x02\x00\x00\x0002")
    p._raw(gb("面包新语\n菠萝包 x3   19.50\n总计 19.50\n"))
    p._raw(b"\x1bd\x05\x1dV0")
    job("graphics_gs_l.bin", p.output, [{"total": "19.50", "has_qr": False,
        "contains": ["面包新语"]}], cuts=1, note="GS ( L and GS 8 L raster graphics")

    # 5. barcodes in both GS k forms, cut GS V 49
    p = pos()
    p.hw("INIT")
    p._raw(gb("华联超市 会员小票\n"))
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        p.barcode("690123456789", "EAN13", function_type="A")
        p.barcode("{B2024050112", "CODE128", function_type="B")
        p.barcode("12345678901", "UPC-A", function_type="B")
        p.barcode("HX-77", "CODE39", function_type="A")
    p._raw(gb("合计 ¥66.00\n"))
    p._raw(b"\x1bd\x04\x1dV1")
    job("barcodes.bin", p.output, [{"total": "66.00", "has_qr": False,
        "contains": ["华联超市 会员小票"]}], cuts=1, note="GS k form A and B barcodes")

    # 6. the POS prints its own native QR (an e-invoice link), feed-and-cut GS V 65 n
    p = pos()
    p.hw("INIT")
    p._raw(gb("海底捞火锅\n桌号: A12  人数: 4\n"))
    items(p, [("番茄锅底", "68.00"), ("肥牛卷", "58.00"), ("虾滑", "48.00")])
    p._raw(gb("应收: 174.00\n"))
    p.set(align="center")
    p._raw(gb("扫码开具电子发票\n"))
    p.qr("https://fapiao.example.cn/i/88412", native=True, size=5)
    p._raw(b"\x1dVA\x05")
    job("own_qr.bin", p.output, [{"total": "174.00", "has_qr": True,
        "contains": ["海底捞火锅", "扫码开具电子发票"]}], cuts=1,
        note="receipt already carrying a native QR")

    # 7. code pages: a single-byte cp1252 receipt (Chinese mode off), then Chinese mode on
    p = pos()
    p.hw("INIT")
    p._raw(b"\x1c.\x1bt\x10" + "Café Müller\nCrème brûlée   6,50\nTotal   6,50 €\n"
           .encode("cp1252"))
    p._raw(b"\x1c&" + gb("欢迎下次光临\n"))
    p._raw(b"\x1bd\x03\x1dVB\x03")
    job("codepages.bin", p.output, [{"total": "6.50", "has_qr": False,
        "contains": ["Café Müller", "Crème brûlée   6,50", "欢迎下次光临"]}], cuts=1,
        note="ESC t 16 (cp1252) with FS . / FS & Chinese mode switches")

    # 8. one job, three receipts: customer copy, merchant copy, kitchen ticket; status traffic
    p = pos()
    p._raw(b"\x10\x04\x01\x1da\x0f")   # DLE EOT 1 status request, GS a ASB enable
    p.hw("INIT")
    p._raw(gb("老王烧烤 顾客联\n羊肉串 x10   30.00\n合计 30.00\n"))
    p._raw(b"\x1bd\x03\x1dVA\x03")
    p._raw(gb("老王烧烤 商户联\n羊肉串 x10   30.00\n合计 30.00\n签名: ________\n"))
    p._raw(b"\x1bd\x03\x1dV\x01")
    p._raw(b"\x1b!\x30" + gb("厨房单 #57\n羊肉串 x10\n") + b"\x1b!\x00")
    p._raw(b"\x1bp\x00\x19\xfa\x1bd\x03\x1dV\x00")   # drawer kick in the tail
    job("multi_receipt.bin", p.output, [
        {"total": "30.00", "has_qr": False, "contains": ["老王烧烤 顾客联"]},
        {"total": "30.00", "has_qr": False, "contains": ["老王烧烤 商户联"]},
        {"total": None, "has_qr": False, "contains": ["厨房单 #57"]}], cuts=3,
        note="three receipts in one job, status requests, drawer kick")

    # 9. 58 mm printer without a cutter: receipts separated by ESC @, the last ends the job
    p = pos()
    p.hw("INIT")
    p._raw(gb("沙县小吃\n拌面 1   6.00\n合计 6.00\n") + b"\n\n\n\n")
    p.hw("INIT")
    p._raw(gb("沙县小吃\n蒸饺 1   8.00\n合计 8.00\n") + b"\n\n\n\n")
    job("no_cutter.bin", p.output, [
        {"total": "6.00", "has_qr": False, "contains": ["拌面 1   6.00"]},
        {"total": "8.00", "has_qr": False, "contains": ["蒸饺 1   8.00"]}], cuts=0,
        profile="nocutter-58", note="no cutter: ESC @ after content and end of job end receipts")

    # 10. NV logo (FS p), NV graphics by key (GS ( L fn 69), obsolete ESC i cut
    p = pos()
    p._raw(b"\x1b@\x1ba\x01\x1cp\x01\x00\x1d(L\x06\x000EL1\x01\x01")
    p._raw(gb("全家便利店\n饭团 x2   11.00\n总计 11.00\n") + b"\x1bd\x04\x1bi")
    job("nv_logo.bin", p.output, [{"total": "11.00", "has_qr": False,
        "contains": ["全家便利店"]}], cuts=1, note="FS p and GS ( L NV logos, ESC i cut")

    # 11. status requests in the tail before the cut (the POS waits for their replies)
    p = pos()
    p.hw("INIT")
    p._raw(gb("7-ELEVEn\n关东煮   9.00\n合计 9.00\n"))
    p._raw(b"\n\n\x10\x04\x04\x1dr\x01\n\n\x1dV\x00")
    job("status_in_tail.bin", p.output, [{"total": "9.00", "has_qr": False,
        "contains": ["7-ELEVEn"]}], cuts=1, note="DLE EOT 4 and GS r 1 between feeds and cut")

    # 12. an unknown vendor command: that receipt is left alone, the next (after ESC @) is not
    p = pos()
    p.hw("INIT")
    p._raw(gb("便利蜂\n") + b"\x1b\x7f\x01" + gb("合计 5.00\n") + b"\x1dV\x00")
    p.hw("INIT")
    p._raw(gb("便利蜂\n合计 7.00\n") + b"\x1dV\x00")
    job("unknown_command.bin", p.output, [
        {"total": "5.00", "has_qr": False, "uncertain": True, "contains": ["便利蜂"]},
        {"total": "7.00", "has_qr": False, "contains": ["合计 7.00"]}], cuts=2,
        note="unknown ESC 7F: uncertain until the next ESC @")

    # 13. the POS closed the connection mid-image
    p = pos()
    p.hw("INIT")
    p._raw(gb("美宜佳\n合计 3.00\n"))
    p._raw(b"\x1dv0\x00\x30\x00\x64\x00" + raster_image(384, 10).tobytes())
    job("truncated.bin", p.output, [{"total": "3.00", "has_qr": False, "uncertain": True,
        "contains": ["美宜佳"]}], cuts=0, note="GS v 0 declares 100 rows, 10 arrive")

    for name in ("logo_gs_v0.bin", "logo_esc_star.bin", "graphics_gs_l.bin"):
        data, expect = jobs[name]
        # the image data really carries cut look-alikes: a naive byte search over-counts cuts
        assert data.count(b"\x1dV") > expect["cuts"], name
    return jobs


def main() -> None:
    jobs = build()
    for name, (data, _) in jobs.items():
        (HERE / name).write_bytes(data)
    manifest = {name: expect for name, (_, expect) in jobs.items()}
    (HERE / "corpus.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n",
                                      encoding="utf-8")
    print(f"{len(jobs)} print jobs written to {HERE}", file=sys.stderr)


if __name__ == "__main__":
    main()

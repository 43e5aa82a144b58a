"""Write the held-out adversarial corpus (tests/receipts/heldout/NAME.bin + NAME.json).

Built by hand from the ESC/POS command reference (Epson TM series, plus the GB18030 printers' FS
commands), the way a POS or driver emits them, without looking at our parser: the point is that
the parser never sees these streams while it is being written. Each sidecar records, from the
generator's own bookkeeping (never from the parser):
  cuts        the real cuts (cut commands at top level that end a receipt) and their offsets;
  qrs         where a QR block must go: a cut index (before that cut, after the previous one) or
              "end" (a whole, uncut receipt that ends at job end);
  spans       [start, end) of every multi-byte command / character: a block may never go inside
              one (end may exceed the stream when the stream stops mid-command);
  why         why the stream gets the QRs it gets (fail-open: uncertain framing gets none).
Run `python tests/heldout_gen.py` to rewrite the files; test_heldout.py checks they match.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "receipts" / "heldout"
ESC, GS, FS, DLE = b"\x1b", b"\x1d", b"\x1c", b"\x10"
# bytes that look like commands, for image / barcode / QR data
LOOKALIKE = b"\x1dV\x00\x1dVA\x03\x1b@\n\x00\x1bi\x1bm\x1dV\x01\x10\x04\x01\x1dr\x01\x1c&\x1b*"


class Stream:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.cuts: list[int] = []
        self.spans: list[list[int]] = []

    def raw(self, data: bytes) -> Stream:
        self.buf += data
        return self

    def cmd(self, data: bytes, declared: int | None = None) -> Stream:
        # declared: the length the command's own header promises (a truncated command)
        start = len(self.buf)
        self.buf += data
        end = start + (declared if declared is not None else len(data))
        if end - start > 1:
            self.spans.append([start, end])
        return self

    def cut(self, data: bytes) -> Stream:
        self.cuts.append(len(self.buf))
        return self.cmd(data)

    def text(self, s: str, enc: str = "gb18030") -> Stream:
        for ch in s:
            self.cmd(ch.encode(enc))
        return self

    def line(self, s: str, enc: str = "gb18030") -> Stream:
        return self.text(s, enc).raw(b"\n")


def gs_v0(m: int, wbytes: int, rows: int, data: bytes) -> bytes:
    size = wbytes.to_bytes(2, "little") + rows.to_bytes(2, "little")
    return GS + b"v0" + bytes([m]) + size + data


def esc_star(m: int, cols: int, data: bytes) -> bytes:
    return ESC + b"*" + bytes([m]) + cols.to_bytes(2, "little") + data


def gs_l(body: bytes) -> bytes:  # GS ( L pL pH m fn ...
    return GS + b"(L" + len(body).to_bytes(2, "little") + body


def gs_8l(body: bytes) -> bytes:  # GS 8 L p1..p4 m fn ...
    return GS + b"8L" + len(body).to_bytes(4, "little") + body


def raster_body(fn: int, wdots: int, rows: int, data: bytes) -> bytes:
    # m=0x30 fn a=0x30 bx by c=0x31 xL xH yL yH d1..dk
    return (b"0" + bytes([fn]) + b"0\x01\x011" + wdots.to_bytes(2, "little")
            + rows.to_bytes(2, "little") + data)


def qr(data: bytes) -> list[bytes]:
    return [GS + b"(k\x04\x001A2\x00", GS + b"(k\x03\x001C\x06", GS + b"(k\x03\x001E1",
            GS + b"(k" + (len(data) + 3).to_bytes(2, "little") + b"1P0" + data,
            GS + b"(k\x03\x001Q0"]


def image_data(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += LOOKALIKE if rng.random() < 0.3 else rng.randbytes(rng.randint(1, 24))
    return bytes(out[:n])


def header(s: Stream, shop: str) -> Stream:
    s.cmd(ESC + b"@").cmd(FS + b"&").cmd(ESC + b"a\x01").cmd(GS + b"!\x11").line(shop)
    return s.cmd(GS + b"!\x00").cmd(ESC + b"a\x00")


def items(s: Stream, rows: list[tuple[str, str]], total: str) -> Stream:
    for name, price in rows:
        s.line(f"{name:<16}{price:>10}")
    s.line("-" * 26)
    s.cmd(ESC + b"E\x01").line(f"合计: ¥{total}").cmd(ESC + b"E\x00")
    return s.line("谢谢惠顾，欢迎再次光临！")


def tail(s: Stream, cut: bytes, feed: int = 4) -> Stream:
    return s.cmd(ESC + b"d" + bytes([feed])).cut(cut)


def build() -> dict[str, tuple[Stream, list[object], str, str]]:
    rng = random.Random(20240601)
    out: dict[str, tuple[Stream, list[object], str, str]] = {}

    s = Stream().cmd(ESC + b"@").cmd(ESC + b"a\x01")
    s.cmd(gs_v0(0, 48, 40, image_data(rng, 48 * 40)))
    header(s, "永辉超市 福州店")
    items(s, [("金龙鱼食用油5L", "69.90"), ("蒙牛纯牛奶", "45.00")], "114.90")
    out["gb_logo_gsv0"] = (tail(s, GS + b"VB\x00"), [0], "one receipt, one real cut (GS V 66 0)",
                           "GS v 0 m=0 logo whose data is full of cut/init/LF/NUL look-alikes")

    s = header(Stream(), "肯德基 KFC 五四路餐厅")
    s.cmd(ESC + b"a\x01").cmd(gs_v0(0x30, 32, 24, (LOOKALIKE * 40)[:32 * 24]))
    s.cmd(gs_v0(3, 16, 16, bytes(16 * 16 - len(LOOKALIKE)) + LOOKALIKE)).raw(b"\n")
    items(s.cmd(ESC + b"a\x00"), [("香辣鸡腿堡", "23.50"), ("可乐(中)", "9.00")], "32.50")
    out["gb_logo_gsv0_m48"] = (tail(s, GS + b"V\x01"), [0], "one receipt, GS V 1",
                               "GS v 0 m=48 and m=3 images ending in a cut look-alike")

    s = Stream().cmd(ESC + b"@").cmd(ESC + b"3\x18")
    for m, k in ((0, 1), (1, 1), (32, 3), (33, 3)):
        s.cmd(esc_star(m, 64, image_data(rng, 64 * k))).raw(b"\n")
    s.cmd(ESC + b"2").line("Corner Bakery", "ascii").line("Croissant x2      7.00", "ascii")
    s.line("Total             7.00", "ascii")
    out["esc_star"] = (tail(s, GS + b"VA\x03", 2), [0], "one receipt, GS V 65 3",
                       "ESC * m=0/1/32/33 column images with look-alike data")

    s = header(Stream(), "面包新语 BreadTalk")
    s.cmd(gs_l(raster_body(0x70, 1280, 409, image_data(rng, 160 * 409))))  # pL pH = 65450
    s.cmd(gs_l(b"02")).raw(b"\n")
    s.cmd(gs_8l(raster_body(0x70, 512, 1100, image_data(rng, 64 * 1100)))).cmd(gs_l(b"02"))
    items(s, [("肉松面包", "12.00"), ("芒果慕斯", "28.00")], "40.00")
    out["gs_l_large"] = (tail(s, GS + b"V\x00"), [0], "one receipt, GS V 0",
                         "GS ( L with pL pH = 65450 and GS 8 L of 70 KB, look-alike data")

    s = header(Stream(), "海底捞火锅 (三坊七巷店)")
    items(s, [("番茄锅底", "48.00"), ("捞派肥牛", "68.00")], "116.00")
    s.cmd(ESC + b"a\x01").line("扫码开具电子发票")
    for c in qr(b"https://fapiao.example.cn/i/77\x1dV\x00\x1b@\n"):
        s.cmd(c)
    s.raw(b"\n")
    out["own_qr"] = (tail(s, ESC + b"i"), [0], "the POS prints its own QR; the default policy "
                     "adds ours too; cut is ESC i", "GS ( k QR with look-alike bytes in its data")

    s = Stream()
    cuts = [GS + b"V\x00", GS + b"V\x01", GS + b"VA\x05", GS + b"VB\x00", ESC + b"i", ESC + b"m"]
    for i, c in enumerate(cuts):
        header(s, f"沙县小吃 {i + 1}号台")
        items(s, [("拌面", "6.00"), ("扁肉", f"{i + 5}.00")], f"{i + 11}.00")
        tail(s, c)
        s.cmd(ESC + b"p\x00\x19\xfa")  # drawer kick after the cut
    out["multi_cuts"] = (s, list(range(6)), "six receipts, six different real cuts",
                         "GS V 0 / 1 / 65 n / 66 n, ESC i, ESC m")

    s = header(Stream(), "便利蜂 无切刀小票")
    items(s, [("三明治", "12.80")], "12.80").cmd(ESC + b"d\x06")
    out["no_cut"] = (s, ["end"], "a whole receipt with no cut: it ends at job end and gets one "
                     "QR there (no command is open at the end)", "no cut at all")

    s = header(Stream(), "物美超市 收银台3").cmd(DLE + b"\x04\x01")
    s.line("可口可乐 330ml        3.00").cmd(GS + b"r\x01").cmd(DLE + b"\x04\x04")
    items(s, [("农夫山泉", "2.00")], "5.00").cmd(DLE + b"\x04\x02").cmd(GS + b"r\x02")
    tail(s, GS + b"VB\x03").cmd(DLE + b"\x04\x03")
    header(s, "物美超市 收银台3").cmd(GS + b"r1").cmd(DLE + b"\x04\x01")
    items(s, [("面巾纸", "9.90")], "9.90").cmd(DLE + b"\x04\x04")
    out["status_mid"] = (tail(s, GS + b"V1"), [0, 1], "two receipts, GS V 66 3 and GS V 49",
                         "DLE EOT n and GS r n inside and between receipts")

    s = Stream().cmd(ESC + b"@").cmd(FS + b".").cmd(ESC + b"t\x10").cmd(ESC + b"R\x00")
    s.line("Café Müller  £ 4,50 — crème brûlée", "cp1252").cmd(ESC + b"t\x00")
    s.line("Résumé ½ ¼ ±", "cp437").cmd(FS + b"&")
    s.line("中文：宫保鸡丁 32.00").cmd(FS + b".").cmd(ESC + b"t\x10")
    s.line("Total € 36,50", "cp1252").cmd(FS + b"&").line("合计: ¥36.50")
    out["codepages"] = (tail(s, GS + b"VB\x10"), [0], "one receipt, GS V 66 16",
                        "ESC t n, FS & / FS . switching between cp1252, cp437 and GB18030")

    s = header(Stream(), "华联超市 会员小票")
    s.cmd(GS + b"H\x02").cmd(GS + b"h\x50").cmd(GS + b"w\x02")
    s.cmd(GS + b"k\x02" + b"690123456789\x00").raw(b"\n")
    s.cmd(GS + b"k\x04" + b"*HX-2024*\x00").raw(b"\n")
    # code set A holds 0x00-0x5F, so control bytes are legal data there; set B is 0x20-0x7F
    code128 = b"{A" + b"\x1dV\x00\x1b@\n\x00\x1dVA" + b"{BOrder-88"
    s.cmd(GS + b"kI" + bytes([len(code128)]) + code128).raw(b"\n")
    s.cmd(GS + b"kE" + bytes([6]) + b"AB-123").raw(b"\n")
    items(s, [("会员积分", "0.00")], "66.00")
    out["barcodes"] = (tail(s, GS + b"V\x00"), [0], "one receipt, GS V 0",
                       "GS k form A (NUL-ended) and form B; CODE128 data holds cut look-alikes")

    s = header(Stream(), "老街 鱼丸")
    # trail bytes 0x40 '@', 0x56 'V', 0x69 'i', 0x6D 'm', 0x64 'd' right after ESC/GS commands;
    # 0x1B can never sit inside a GB18030 character, so it only appears between characters
    looks = bytes([0x81, 0x40, 0x81, 0x56, 0x81, 0x69, 0x81, 0x6D, 0x81, 0x64]).decode("gb18030")
    for ch in looks + "\U00020000\u20ac\u3400":
        s.cmd(ESC + b"E\x01").text(ch).cmd(ESC + b"E\x00").cmd(GS + b"!\x01").text(ch)
        s.cmd(ESC + b"-\x01").text("鱼").cmd(ESC + b"-\x00")
    s.raw(b"\n")
    items(s, [("鱼丸汤", "15.00")], "15.00")
    out["gb_esc_between"] = (tail(s, ESC + b"m"), [0], "one receipt, ESC m",
                             "ESC/GS commands between GB18030 chars whose trail bytes spell "
                             "@ V i m d; 4-byte chars")

    s = header(Stream(), "第一张 完整小票")
    tail(items(s, [("豆浆", "3.00")], "3.00"), GS + b"V\x00")
    header(s, "第二张 中途断开")
    items(s, [("油条", "2.50")], "2.50")
    s.cmd(gs_v0(0, 48, 100, image_data(rng, 500)), declared=8 + 48 * 100)
    out["truncated_image"] = (s, [0], "the first receipt is cut; the second stops inside a "
                              "GS v 0 image, so its framing is unknown: fail-open, no QR",
                              "ends mid-command (GS v 0 data)")

    s = header(Stream(), "绝对长度 一")
    tail(items(s, [("米粉", "8.00")], "8.00"), GS + b"VA\x00")
    header(s, "绝对长度 二")
    junk = "合计: ¥99.00\n".encode("gb18030") + LOOKALIKE + b"\x1dV\x00"
    s.cmd(GS + b"8L" + (0x7FFFFFF0).to_bytes(4, "little") + raster_body(0x70, 2048, 8000, junk),
          declared=8 + 0x7FFFFFF0)
    out["absurd_gs8l"] = (s, [0], "one real cut; then GS 8 L promises 2 GB so the cut after it "
                          "is image data and the stream ends inside it: no QR for that receipt",
                          "absurd 4-byte length swallows a cut look-alike")

    s = header(Stream(), "ESC星号 超长")
    tail(items(s, [("奶茶", "16.00")], "16.00"), ESC + b"i")
    header(s, "第二张")
    s.cmd(esc_star(33, 0xFFFF, image_data(rng, 300)), declared=5 + 3 * 0xFFFF)
    out["absurd_esc_star"] = (s, [0], "ESC * with 65535 24-dot columns (196 KB promised, 300 "
                              "sent): the second receipt ends mid-command, no QR",
                              "absurd ESC * length")

    s = header(Stream(), "断在切纸命令")
    tail(items(s, [("包子", "2.00")], "2.00"), GS + b"V\x01")
    header(s, "第二张")
    items(s, [("馒头", "1.00")], "1.00").cmd(ESC + b"d\x03").cmd(GS + b"V", declared=3)
    out["truncated_cut"] = (s, [0], "the second receipt's GS V has no m: it may or may not be a "
                            "cut, so that receipt is uncertain and gets none", "ends in GS V")

    s = Stream()
    header(s, "万达影城 卖品部").cmd(ESC + b"a\x01")
    s.cmd(esc_star(33, 96, image_data(rng, 288))).raw(b"\n").cmd(DLE + b"\x04\x01")
    s.cmd(gs_v0(0, 24, 24, image_data(rng, 576))).cmd(ESC + b"a\x00")
    items(s, [("爆米花(大)", "38.00"), ("可乐", "12.00")], "50.00")
    tail(s, GS + b"VA\x00").cmd(ESC + b"p\x00\x19\xfa").cmd(GS + b"r\x01")
    header(s, "万达影城 取票")
    s.cmd(gs_l(raster_body(0x70, 128, 32, image_data(rng, 16 * 32)))).cmd(gs_l(b"02"))
    items(s, [("电影票 x2", "90.00")], "90.00")
    for c in qr(b"TICKET:\x1dV\x00\x1bi:0042"):
        s.cmd(c)
    s.raw(b"\n")
    out["mixed"] = (tail(s, GS + b"VB\x05"), [0, 1], "two receipts, GS V 65 0 and GS V 66 5",
                    "everything at once: ESC *, GS v 0, GS ( L, own QR, status, drawer kick")
    s = header(Stream(), "瑞幸咖啡 尾部标志")
    items(s, [("生椰拿铁", "15.80")], "15.80").cmd(ESC + b"a\x01")
    s.cmd(gs_v0(0, 24, 40, (LOOKALIKE * 40)[:24 * 40])).cmd(ESC + b"a\x00")
    s.cmd(ESC + b"d\x03").cmd(GS + b"r\x01").cmd(DLE + b"\x04\x01").raw(b"\n\n")
    out["logo_in_tail"] = (s.cut(GS + b"V\x00"), [0], "one receipt; the logo after the total "
                           "is printed matter, the block goes after it", "image, status in tail")

    # no ESC @ between receipts; parameters that look like commands: ESC d 29 (0x1D),
    # GS V 65 27 (0x1B), GS V 66 10 (LF)
    s = Stream().cmd(ESC + b"@").cmd(FS + b"&")
    for i, c in enumerate([GS + b"VA\x1b", GS + b"VB\x0a", GS + b"VA\x1d"]):
        s.line(f"背靠背小票 {i + 1}")
        items(s, [("烧仙草", "9.00")], "9.00").cmd(ESC + b"d\x1d")
        s.cut(c)
    out["back_to_back"] = (s, [0, 1, 2], "three receipts with no ESC @ between them",
                           "cut/feed parameters equal to ESC, GS and LF")
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (s, qrs, why, note) in build().items():
        (OUT / f"{name}.bin").write_bytes(bytes(s.buf))
        side = {"note": note, "cuts": len(s.cuts), "cut_offsets": s.cuts, "qrs": qrs,
                "why": why, "spans": s.spans}
        (OUT / f"{name}.json").write_text(json.dumps(side, ensure_ascii=False) + "\n",
                                          encoding="utf-8")


if __name__ == "__main__":
    main()

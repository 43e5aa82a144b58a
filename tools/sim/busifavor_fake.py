"""A loopback fake of WeChat Pay APIv3 merchant coupons (商家券, busifavor), for tests.

Serves, over real HTTP on 127.0.0.1:
- GET  /v3/certificates                       platform certificate, AEAD_AES_256_GCM envelope
- GET  /v3/marketing/busifavor/stocks/{stock_id}
- GET  /v3/marketing/busifavor/users/{openid}/coupons/{coupon_code}/appids/{appid}
- POST /v3/marketing/busifavor/coupons/use

Like the real service it checks each request's WECHATPAY2-SHA256-RSA2048 Authorization
against the merchant's public key (401 SIGN_ERROR otherwise), signs every reply with the
platform key, answers errors as {"code", "message"} with the HTTP status, and treats a repeated
use_request_no for the same coupon as the same request (same success, one use recorded).

Faults (set on .faults, consumed per request): busy (500 SYSTEM_ERROR), limited (429
FREQUENCY_LIMITED), drop_after_commit (commit a use, close without replying), hold (block the
reply until released; a held use commits only after release), foreign_signer (sign replies
with a key that is not the platform's).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

SCHEME = "WECHATPAY2-SHA256-RSA2048"
_AUTH_FIELD = re.compile(r'(\w+)="([^"]*)"')
_COUPON = re.compile(r"^/v3/marketing/busifavor/users/([^/]+)/coupons/([^/]+)/appids/([^/?]+)$")
_STOCK = re.compile(r"^/v3/marketing/busifavor/stocks/([^/?]+)$")
_CST = dt.timezone(dt.timedelta(hours=8))
STATES = ("SENDED", "USED", "EXPIRED", "DEACTIVATED")


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, _CST).isoformat(timespec="seconds")


def new_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def self_signed(key: rsa.RSAPrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365)).sign(key, hashes.SHA256()))


def sign(key: rsa.RSAPrivateKey, text: str) -> str:
    return base64.b64encode(key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


@dataclass
class Coupon:
    code: str
    stock_id: str
    openid: str
    state: str = "SENDED"
    begin: float = 0.0
    end: float = 4102444800.0  # 2100-01-01
    use_request_no: str | None = None
    use_time: str | None = None


@dataclass
class Stock:
    stock_id: str
    name: str
    stock_type: str = "NORMAL"  # NORMAL (满减), DISCOUNT, EXCHANGE
    rule: dict[str, Any] = field(default_factory=lambda: {
        "fixed_normal_coupon": {"discount_amount": 500, "transaction_minimum": 3000}})
    goods_name: str = "全场可用"


@dataclass
class Faults:
    busy: int = 0
    limited: int = 0
    drop_after_commit: int = 0
    hold: threading.Event | None = None  # replies wait until it is set
    foreign_signer: rsa.RSAPrivateKey | None = None


class BusifavorFake:
    def __init__(self, *, mchid: str, appids: tuple[str, ...], merchant_public_pem: str,
                 merchant_serial: str, apiv3_key: str, stocks: list[Stock],
                 coupons: list[Coupon]) -> None:
        self.mchid, self.appids, self.apiv3_key = mchid, appids, apiv3_key
        self._merchant = serialization.load_pem_public_key(merchant_public_pem.encode())
        self.merchant_serial = merchant_serial
        self.platform_key = new_rsa()
        self.platform_cert = self_signed(self.platform_key, "Tenpay.com Root CA (fake)")
        self.platform_serial = format(self.platform_cert.serial_number, "X")
        self.stocks = {s.stock_id: s for s in stocks}
        self.coupons = {c.code: c for c in coupons}
        self.uses: list[tuple[str, str]] = []  # (coupon_code, use_request_no), one per commit
        self.faults = Faults()
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def platform_public_pem(self) -> str:
        return public_pem(self.platform_key)

    def __enter__(self) -> BusifavorFake:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.faults.hold is not None:
            self.faults.hold.set()
        self._server.shutdown()
        self._server.server_close()

    # --- request checks ----------------------------------------------------------------

    def check_auth(self, method: str, target: str, body: str, header: str | None) -> str | None:
        """None when the Authorization header is a valid merchant signature, else why not."""
        if not header or not header.startswith(SCHEME + " "):
            return "Authorization头缺失或认证类型错误"
        fields = dict(_AUTH_FIELD.findall(header[len(SCHEME) + 1:]))
        if fields.get("mchid") != self.mchid:
            return "商户号与签名不匹配"
        if fields.get("serial_no", "").upper() != self.merchant_serial.upper():
            return "商户证书序列号有误"
        ts = fields.get("timestamp", "")
        if not ts.isdigit() or abs(time.time() - int(ts)) > 300:
            return "请求时间戳过期"
        text = f"{method}\n{target}\n{ts}\n{fields.get('nonce_str', '')}\n{body}\n"
        try:
            self._merchant.verify(base64.b64decode(fields.get("signature", "")),  # type: ignore[union-attr,call-arg]
                                  text.encode(), padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            return "错误的签名，验签失败"
        return None

    # --- endpoints ---------------------------------------------------------------------

    def certificates(self) -> tuple[int, dict[str, Any]]:
        pem = self.platform_cert.public_bytes(serialization.Encoding.PEM).decode()
        nonce, aad = secrets.token_hex(6), "certificate"
        sealed = AESGCM(self.apiv3_key.encode()).encrypt(nonce.encode(), pem.encode(), aad.encode())
        cert = self.platform_cert
        return 200, {"data": [{
            "serial_no": self.platform_serial,
            "effective_time": rfc3339(cert.not_valid_before_utc.timestamp()),
            "expire_time": rfc3339(cert.not_valid_after_utc.timestamp()),
            "encrypt_certificate": {"algorithm": "AEAD_AES_256_GCM", "nonce": nonce,
                                    "associated_data": aad,
                                    "ciphertext": base64.b64encode(sealed).decode()}}]}

    def stock(self, stock_id: str) -> tuple[int, dict[str, Any]]:
        s = self.stocks.get(stock_id)
        if s is None:
            return _err(404, "RESOURCE_NOT_EXISTS", "批次不存在")
        return 200, {"stock_id": s.stock_id, "stock_name": s.name, "belong_merchant": self.mchid,
                     "goods_name": s.goods_name, "stock_type": s.stock_type,
                     "coupon_use_rule": dict(s.rule), "stock_state": "RUNNING",
                     "coupon_code_mode": "MERCHANT_UPLOAD"}

    def coupon(self, openid: str, code: str, appid: str) -> tuple[int, dict[str, Any]]:
        if appid not in self.appids:
            return _err(403, "NO_AUTH", "appid与商户号无绑定关系")
        c = self.coupons.get(code)
        if c is None or c.openid != openid:
            return _err(404, "RESOURCE_NOT_EXISTS", "券不存在")
        s = self.stocks[c.stock_id]
        body: dict[str, Any] = {
            "coupon_code": c.code, "stock_id": c.stock_id, "coupon_state": c.state,
            "stock_name": s.name, "stock_type": s.stock_type, "goods_name": s.goods_name,
            "belong_merchant": self.mchid, "coupon_use_rule": dict(s.rule),
            "available_start_time": rfc3339(c.begin), "expire_time": rfc3339(c.end)}
        if c.use_request_no:
            body.update(use_request_no=c.use_request_no, use_time=c.use_time)
        return 200, body

    def use(self, req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        code, appid, no = req.get("coupon_code"), req.get("appid"), req.get("use_request_no")
        if not all(isinstance(v, str) and v for v in (code, appid, no, req.get("use_time"))):
            return _err(400, "PARAM_ERROR", "缺少必填参数")
        if appid not in self.appids:
            return _err(403, "NO_AUTH", "appid与商户号无绑定关系")
        c = self.coupons.get(str(code))
        stock_id = req.get("stock_id")
        if c is None or (stock_id is not None and stock_id != c.stock_id):
            return _err(404, "RESOURCE_NOT_EXISTS", "券不存在或不属于该批次")
        if "openid" in req and req["openid"] != c.openid:
            return _err(400, "PARAM_ERROR", "openid与券不匹配")
        if c.state == "USED" and c.use_request_no == no:
            return 200, self._used(c)  # the same request again: the same answer
        if any(n == no for _, n in self.uses):
            return _err(400, "INVALID_REQUEST", "核销请求单据号已被其他券使用")
        now = time.time()
        if c.state == "SENDED" and c.end < now:
            c.state = "EXPIRED"
        if c.state != "SENDED" or now < c.begin:
            why = {"USED": "券已核销", "EXPIRED": "券已过期", "DEACTIVATED": "券已失效"}
            return _err(400, "INVALID_REQUEST", why.get(c.state, "券未到可用时间"))
        c.state, c.use_request_no, c.use_time = "USED", str(no), rfc3339(now)
        self.uses.append((c.code, str(no)))
        return 200, self._used(c)

    def _used(self, c: Coupon) -> dict[str, Any]:
        return {"stock_id": c.stock_id, "openid": c.openid, "wechatpay_use_time": c.use_time}

    def signed_headers(self, body: bytes) -> dict[str, str]:
        ts, nonce = str(int(time.time())), secrets.token_hex(16)
        key = self.faults.foreign_signer or self.platform_key
        return {"Wechatpay-Timestamp": ts, "Wechatpay-Nonce": nonce,
                "Wechatpay-Serial": self.platform_serial,
                "Wechatpay-Signature-Type": SCHEME,
                "Wechatpay-Signature": sign(key, f"{ts}\n{nonce}\n{body.decode()}\n"),
                "Request-ID": secrets.token_hex(8)}


def _err(status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"code": code, "message": message}


def _handler(fake: BusifavorFake) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests read outcomes, not access logs

        def do_GET(self) -> None:
            self._serve("GET", "")

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            self._serve("POST", self.rfile.read(n).decode("utf-8", "replace"))

        def _serve(self, method: str, body: str) -> None:
            why = fake.check_auth(method, self.path, body, self.headers.get("Authorization"))
            if why is not None:
                return self._reply(401, {"code": "SIGN_ERROR", "message": why})
            f = fake.faults
            if f.hold is not None:
                f.hold.wait(30)
            with fake.lock:
                fault = "busy" if f.busy else "limited" if f.limited else None
                if fault == "busy":
                    f.busy -= 1
                    return self._reply(500, {"code": "SYSTEM_ERROR", "message": "系统繁忙"})
                if fault == "limited":
                    f.limited -= 1
                    return self._reply(429, {"code": "FREQUENCY_LIMITED", "message": "频率超限"})
                status, reply = self._route(method, body)
                if method == "POST" and status == 200 and f.drop_after_commit:
                    f.drop_after_commit -= 1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # committed, reply lost
                    return None
            return self._reply(status, reply)

        def _route(self, method: str, body: str) -> tuple[int, dict[str, Any]]:
            path = self.path.split("?", 1)[0]
            if method == "GET" and path == "/v3/certificates":
                return fake.certificates()
            if method == "GET" and (m := _STOCK.match(path)):
                return fake.stock(m.group(1))
            if method == "GET" and (m := _COUPON.match(path)):
                return fake.coupon(*m.groups())
            if method == "POST" and path == "/v3/marketing/busifavor/coupons/use":
                try:
                    req = json.loads(body)
                except ValueError:
                    return _err(400, "PARAM_ERROR", "请求体不是JSON")
                return fake.use(req if isinstance(req, dict) else {})
            return _err(404, "NOT_FOUND", "接口不存在")

        def _reply(self, status: int, obj: dict[str, Any]) -> None:
            raw = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in fake.signed_headers(raw).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

    return Handler


def merchant_identity() -> tuple[str, str, str]:
    """A fresh merchant key for tests: (private PEM, public PEM, certificate serial hex)."""
    key = new_rsa()
    return private_pem(key), public_pem(key), secrets.token_hex(20).upper()


"""Coupon verification backends: one neutral vocabulary, one module per backend.

- base.py: the errors, CodeInfo, the CardBackend protocol and the one transport policy
  (timeouts, a total deadline per operation, a reply cap) every backend keeps;
- wechat_card.py: the WeChat card API (httpx); busifavor.py: WeChat Pay merchant coupons
  (wechatpayv3 over requests); sim/: the WeChat card API simulator;
- tokens.py: the WeChat access token of one hostd (stable_token shared by every till, refusals
  logged and counted, force refresh kept within the platform's limits);
- factory.py: make_backend(config, backend_url=None), the backend a config names, as a source
  of per-thread clients sharing one token cache (and the embedded simulator's owner).
"""

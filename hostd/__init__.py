# hexiao-hostd: the host daemon (device link, redemption, receipt tap, control socket).

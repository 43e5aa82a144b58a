# USB HID boot keyboard next to MicroPython's built-in CDC (the link), on machine.USBDevice
# (rp2040, esp32s3). micropython-lib's usb-device packages are not on the registry: this is
# the small part of them a keyboard needs, with the standard boot-keyboard report descriptor.
#
# Rules kept here:
# - the built-in CDC keeps its interfaces and endpoints; the HID interface goes after them
#   (interface itf_max, IN endpoint ep_max | 0x80), and the config header is patched to match;
# - one report in flight on the interrupt endpoint: key() waits (bounded) for the last one.

import machine

# boot keyboard: 8 modifier bits, a reserved byte, 5 LED bits (out), 6 keycodes (0..0x65)
REPORT_DESC = bytes.fromhex(
    "05010906a101050719e029e71500250175019508810295017508810195057501"
    "05081901290591029501750391019506750815002565050719002965"
    "8100c0")
_HID_CLASS = 3


def report(mod, usage):
    """The 8-byte boot-keyboard input report: modifiers, reserved, one keycode, 5 empty."""
    r = bytearray(8)
    r[0] = mod
    r[2] = usage
    return r


def config_desc(base, itf, ep):
    """The built-in driver's configuration descriptor with a HID keyboard interface added."""
    n = len(REPORT_DESC)
    extra = bytes((9, 4, itf, 0, 1, _HID_CLASS, 1, 1, 0,  # interface: HID, boot, keyboard
                   9, 0x21, 0x11, 0x01, 0, 1, 0x22, n & 0xFF, n >> 8,  # HID 1.11, 1 report desc
                   7, 5, ep | 0x80, 3, 8, 0, 5))  # interrupt IN, 8 bytes, every 5 ms
    d = bytearray(base) + extra
    total = len(d)
    d[2] = total & 0xFF
    d[3] = total >> 8
    d[4] = base[4] + 1  # bNumInterfaces
    return d


class Keyboard:
    def __init__(self, usb=None):
        self.usb = usb or machine.USBDevice()
        b = self.usb.BUILTIN_CDC
        self.itf = b.itf_max
        self.ep = b.ep_max | 0x80
        self.busy = False
        self.usb.active(False)
        self.usb.builtin_driver = b
        self.usb.config(b.desc_dev, config_desc(b.desc_cfg, b.itf_max, b.ep_max),
                        control_xfer_cb=self._control, xfer_cb=self._done)
        self.usb.active(True)

    def _control(self, stage, req):
        # req: the 8-byte setup packet; answer GET_DESCRIPTOR(report) and the class requests
        if stage != 1 or req[4] != self.itf:
            return True
        if req[0] == 0x81 and req[1] == 6 and req[3] == 0x22:
            return REPORT_DESC
        if req[0] == 0x21 and req[1] in (0x09, 0x0A, 0x0B):  # SET_REPORT/IDLE/PROTOCOL
            return bytearray(req[6]) if req[1] == 0x09 else True
        if req[0] == 0xA1 and req[1] == 1:  # GET_REPORT: nothing pressed
            return report(0, 0)
        return False  # stall what a keyboard does not do

    def _done(self, ep, result, n):
        if ep == self.ep:
            self.busy = False

    def key(self, mod, usage, spin=20000):
        while self.busy and spin:  # the previous report is at most one poll interval away
            spin -= 1
            machine.idle()
        self.busy = True
        if not self.usb.submit_xfer(self.ep, report(mod, usage)):
            self.busy = False  # not configured (no host): the report is dropped

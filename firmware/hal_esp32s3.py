# The esp32s3 board (ESP32-S3-DevKitC-1 wiring): scan engine on UART1 (GPIO17 tx, GPIO18 rx),
# buzzer on GPIO4, the on-board NeoPixel on GPIO48, BOOT button (GPIO0), hardware timer 0.
# Native USB (not the UART bridge): built-in CDC + HID keyboard, as on the rp2040.

from hexiao.firmware.hal_rp2040 import Board as _Board


class Board(_Board):
    name = "esp32s3"
    PINS = (1, 17, 18, 4, 48, 0, 0)  # uart id, tx, rx, buzzer, led, button, timer id

"""For support engineers: hostd's status, devices, journal and captures through the control socket
(or straight from a device), decoding captures, the doctor.
"""

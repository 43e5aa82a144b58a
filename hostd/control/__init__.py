"""hexiao-hostd's control socket: the server, its client, the command table and the handlers."""

"""Socket.IO hub: authenticated connections, authorised rooms, replay of streams."""

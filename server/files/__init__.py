"""Files sent in chats: stored in the database (GridFS), readable by the chat's members."""

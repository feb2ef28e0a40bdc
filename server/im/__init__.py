"""The messenger: private dialogs, group chats, read state, system notices."""

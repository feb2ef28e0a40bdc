"""Tasks: assignment, the Bitrix24 status workflow (accept, start, complete, approve...), who may
see and change a task, overdue and expiring deadlines, and the per-role task counters."""

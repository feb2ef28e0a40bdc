"""Mail bridge: CRM mail out with reply codes, replies in over SMTP/LMTP and IMAP.

Not built yet: see the mail bridge issue.
"""

"""Portal Hub: the real-time core of an intranet portal (push, Jabber, mail to CRM)."""

__version__ = "0.1.0"

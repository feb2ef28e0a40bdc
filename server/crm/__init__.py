"""CRM: leads, contacts, companies, deals, their links and activities."""

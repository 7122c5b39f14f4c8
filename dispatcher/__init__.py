"""athome-ops dispatcher: command emails in, Ansible runs, replies out."""

__version__ = "0.1.0"

"""The one base type of every error a user can cause (a bad sweep file, unprepared data, a missing weight file,
privacy parameters that cannot hold). The command line catches it once and prints its message, never a
traceback; each subclass's message names the field or file, the value and the fix."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and how."""

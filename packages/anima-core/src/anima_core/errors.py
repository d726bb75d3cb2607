"""Errors that mean "the user's input is wrong": the CLI prints them in one message and exits with code 2."""


class UserError(Exception):
    """Bad input (a file, a field, a flag): say which, what was expected and what was found."""

"""Imported as ``__mp_main__`` by spawned child processes (see ``_torchvision_compat``): importing the package
applies the torchvision work-around before the child unpickles any Lightning object."""
import opdf_exp  # noqa: F401

"""Test helpers shared by every test tier (tiny model folders, ...)."""

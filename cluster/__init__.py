"""Running medssl at scale: process groups, launch recipes, and runtime helpers for all stages."""

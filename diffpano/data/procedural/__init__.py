"""Procedural indoor scenes: floor plans, furniture, materials, walks, their renderers and builds."""

"""Parallelism: meshes, logical-axis rules, and the expert, pipeline and context parallel pieces.

Model code names logical axes only; `rules` maps them to the mesh axes of `mesh.AXES`, and a layout
(`layout.ParallelConfig`) bundles a mesh shape, rules and the expert / pipeline settings.
"""

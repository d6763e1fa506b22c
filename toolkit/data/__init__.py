"""Sections in, model-ready arrays out: her2st reader, expression preprocessing, patches."""

from __future__ import annotations

from mclx.data.her2st import find_data_root, list_sections, read_her2st, read_section
from mclx.data.patches import extract_patches
from mclx.data.preprocess import highly_variable_genes, load_gene_list, normalize_expression
from mclx.data.slide import load_image

__all__ = [
    "extract_patches",
    "find_data_root",
    "highly_variable_genes",
    "list_sections",
    "load_gene_list",
    "load_image",
    "normalize_expression",
    "read_her2st",
    "read_section",
]

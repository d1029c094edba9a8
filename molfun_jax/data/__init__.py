"""Data: real structures (and precomputed OpenFold features) in, model-ready batches out.

    parsed = parse_structure("1hvr.pdb")                 # Biopython, PDB / mmCIF, gzip or not
    feats = make_features(parsed)                        # one example, OpenFold feature names
    ds = AffinityDataset.from_csv("data.csv", "structures/")
    ds = AffinityDataset.from_csv("INDEX_general_PL_data.2016", "pdbbind/")   # PDBbind index + layout
    entries, bad = read_entries("new.csv", "structures/", labelled=False)   # labels optional
    train, val = demo_data(seed=0)                        # synthetic helices (the CLI's --demo)
    train, val, test = identity_split(ds, (0.8, 0.1, 0.1), threshold=0.3)
    for batch in train.batches(4, shuffle=True): ...      # leading batch axis, one bucket each

Precomputed `.pkl` features are unpickled (which can run code): load only your own files.
"""
from molfun_jax.data.buckets import (CROP_MODES, DEFAULT_BUCKETS, bucket_length, collate,
                                     crop_features, crop_indices, pad_features)
from molfun_jax.data.dataset import (STRUCTURE_SUFFIXES, AffinityDataset, BadEntry, DatasetConfig, Entry,
                                     EntryFilters, build_example, build_examples, entry_ligand, example_depths,
                                     read_entries, render_bad_entries, structure_ids)
from molfun_jax.data.ligand import (LIGAND_FEATURE_VERSION, Ligand, LigandConfig, ligand_features,
                                    ligand_from_structure, ligand_pocket_mask, read_ligand)
from molfun_jax.data.pdbbind import IndexEntry, is_pdbbind_index, read_index, resolve_entry
from molfun_jax.data.demo import DEMO_LEN, DEMO_TRAIN, DEMO_VAL, demo_data, synthetic_structure
from molfun_jax.data.errors import DataError, EntryError, StructureError
from molfun_jax.data.features import FeatureConfig, ligand_distance, make_features, pocket_mask
from molfun_jax.data.parsing import chain_sequences, parse_structure
from molfun_jax.data.precomputed import align_precomputed, load_precomputed
from molfun_jax.data.splits import (identity_clusters, identity_split, identity_split_indices, random_split,
                                    random_split_indices, sequence_identity, temporal_split,
                                    temporal_split_indices)
from molfun_jax.feature_schema import FEATURE_SCHEMA, FeatureSchema, FeatureSpec

__all__ = [
    "AffinityDataset", "BadEntry", "CROP_MODES", "DEFAULT_BUCKETS", "DEMO_LEN", "DEMO_TRAIN", "DEMO_VAL",
    "DataError", "DatasetConfig", "Entry", "EntryError", "EntryFilters", "IndexEntry", "LIGAND_FEATURE_VERSION",
    "Ligand", "LigandConfig", "entry_ligand", "is_pdbbind_index", "ligand_features", "ligand_from_structure",
    "ligand_pocket_mask", "read_index", "read_ligand", "resolve_entry", "FEATURE_SCHEMA", "FeatureConfig", "FeatureSchema",
    "FeatureSpec", "STRUCTURE_SUFFIXES", "StructureError", "align_precomputed", "bucket_length", "build_example",
    "build_examples", "chain_sequences", "collate", "crop_features", "crop_indices", "demo_data", "example_depths",
    "identity_clusters", "read_entries", "structure_ids", "synthetic_structure",
    "identity_split", "identity_split_indices", "ligand_distance", "load_precomputed", "make_features",
    "pad_features", "parse_structure", "pocket_mask", "random_split", "random_split_indices",
    "render_bad_entries", "sequence_identity", "temporal_split", "temporal_split_indices",
]

"""Point-group symmetry: names (:mod:`.names`, parsing only), RELION's operators and the group
average (:mod:`.groups`), and the exact projection onto symmetric maps (:mod:`.subspace`)."""

"""The YAML recipes; a package only so that they ship inside the wheel (launch/recipes.py finds them)."""

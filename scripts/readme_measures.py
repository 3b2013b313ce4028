"""Writes README.md's table of similarity measures from similarity.table()
(run it after a measure's attributes change; test_similarity_measures checks
that the README holds what it would write)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- measures table: begin -->", "<!-- measures table: end -->"


def markdown() -> str:
    from spectral_ext.similarity import table

    rows = ["| measure | kind | invariant to | reference | cost of a pair |", "|---|---|---|---|---|"]
    rows += [f"| `{r.name}` | {r.kind} | {r.invariances} | [{r.reference}](docs/references.md#{r.reference}) | "
             f"{r.cost} |" for r in table().itertuples()]
    return "\n".join(rows)


def written(readme: str) -> str:
    """readme with its table replaced by markdown()."""
    pattern = re.escape(BEGIN) + ".*?" + re.escape(END)
    return re.sub(pattern, lambda _: f"{BEGIN}\n{markdown()}\n{END}", readme, flags=re.S)


if __name__ == "__main__":
    README.write_text(written(README.read_text()))

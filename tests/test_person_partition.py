"""Persons in the federated partition and the refusal of components as person-level DP units."""
import numpy as np
import pytest

from finetune.data import generate_records, record_people
from finetune.federated.partition import person_components, refuse_component_units, split_by_person


def test_every_person_id_lives_in_one_organisation():
    """Persons named by e-mail only ("Forward the report to {e} and copy {e2}") must stay with the
    rest of their records; matching names alone let them move to another organisation."""
    for people in (150, 400):
        records = generate_records(600, seed=3, people=people)
        shards = split_by_person(records, 4, seed=0)
        owner = {}
        for org, rows in enumerate(shards):
            for i in rows:
                for x in record_people([records[i]])[0]:
                    assert owner.setdefault(x, org) == org, f"person {x} in two organisations"


def test_a_bridge_person_splits_a_component():
    recs = [{"text": "", "people": ["A", "X"]}, {"text": "", "people": ["X", "C"]},
            {"text": "", "people": ["A", "D"]}, {"text": "", "people": ["C", "E"]}]
    assert len(set(person_components(recs).tolist())) == 1
    without_x = [r for r in recs if "X" not in r["people"]]   # X bridged {A, D} and {C, E}
    assert len(set(person_components(without_x).tolist())) == 2
    with pytest.raises(ValueError, match="split a component") as e:
        refuse_component_units()
    assert "\n" not in str(e.value)


def test_legacy_corpus_without_ids_still_splits_by_name():
    recs = [{"text": "", "pii": [["name", "A"]]}, {"text": "", "pii": [["name", "A"], ["name", "B"]]},
            {"text": "", "pii": [["name", "C"]]}]
    lab = person_components(recs)
    assert lab[0] == lab[1] != lab[2]
    assert np.array_equal(lab, person_components([dict(r) for r in recs]))

"""The pure directory rules: department ancestry, the supervisor relation, who may see whom."""

from __future__ import annotations

import itertools

import pytest

from server.directory.rules import (
    MAX_SEARCH_WORDS,
    DepartmentNode,
    Person,
    ancestors,
    departments_named,
    descendants,
    is_supervisor,
    may_see_user,
    phone_search,
    search_words,
    supervisors_of,
)


def tree_of(*nodes: tuple[str, str | None, str | None]) -> dict[str, DepartmentNode]:
    return {dept_id: DepartmentNode(dept_id, parent, head) for dept_id, parent, head in nodes}


# company                  head: ceo
# +-- sales                head: sam
# |   +-- sales-north      head: nora
# |   |   +-- north-field  head: None
# |   +-- sales-south      head: sam (the same person heads two levels)
# +-- it                   head: None
#     +-- it-ops           head: olga
TREE = tree_of(
    ("company", None, "ceo"),
    ("sales", "company", "sam"),
    ("sales-north", "sales", "nora"),
    ("north-field", "sales-north", None),
    ("sales-south", "sales", "sam"),
    ("it", "company", None),
    ("it-ops", "it", "olga"),
)

# a -> b -> c -> a, and d hangs below the cycle
CYCLIC = tree_of(
    ("a", "b", "head-a"),
    ("b", "c", "head-b"),
    ("c", "a", "head-c"),
    ("d", "a", "head-d"),
)


@pytest.mark.parametrize(
    ("department_id", "expected"),
    [
        ("company", ["company"]),
        ("sales", ["sales", "company"]),
        ("north-field", ["north-field", "sales-north", "sales", "company"]),
        ("it-ops", ["it-ops", "it", "company"]),
        (None, []),
        ("no-such-department", []),
    ],
)
def test_ancestors_runs_from_the_department_to_the_root(
    department_id: str | None, expected: list[str]
) -> None:
    assert ancestors(department_id, TREE) == expected


def test_ancestors_stop_at_a_parent_missing_from_the_tree() -> None:
    tree = tree_of(("orphan", "deleted-parent", None))
    assert ancestors("orphan", tree) == ["orphan"]


@pytest.mark.parametrize(
    ("department_id", "expected"),
    [
        ("a", ["a", "b", "c"]),
        ("b", ["b", "c", "a"]),
        ("d", ["d", "a", "b", "c"]),
    ],
)
def test_ancestors_cut_a_cycle_instead_of_looping(department_id: str, expected: list[str]) -> None:
    assert ancestors(department_id, CYCLIC) == expected


def test_ancestors_of_a_self_parented_department() -> None:
    tree = tree_of(("loop", "loop", "x"))
    assert ancestors("loop", tree) == ["loop"]


@pytest.mark.parametrize(
    ("department_id", "expected"),
    [
        (
            "company",
            {"company", "sales", "sales-north", "north-field", "sales-south", "it", "it-ops"},
        ),
        ("sales", {"sales", "sales-north", "north-field", "sales-south"}),
        ("sales-north", {"sales-north", "north-field"}),
        ("north-field", {"north-field"}),
        ("it", {"it", "it-ops"}),
    ],
)
def test_descendants_include_the_department_and_everything_below(
    department_id: str, expected: set[str]
) -> None:
    assert descendants(department_id, TREE) == expected


def test_descendants_terminate_on_a_cycle() -> None:
    assert descendants("a", CYCLIC) == {"a", "b", "c", "d"}
    assert descendants("d", CYCLIC) == {"d"}


def test_descendants_of_an_unknown_department_is_only_itself() -> None:
    assert descendants("ghost", TREE) == {"ghost"}


def test_every_department_is_among_the_descendants_of_each_of_its_ancestors() -> None:
    for dept_id in TREE:
        for ancestor in ancestors(dept_id, TREE):
            assert dept_id in descendants(ancestor, TREE), (dept_id, ancestor)
        outside = set(TREE) - set(ancestors(dept_id, TREE))
        for other in outside:
            assert dept_id not in descendants(other, TREE), (dept_id, other)


@pytest.mark.parametrize(
    ("person", "expected"),
    [
        # an employee: own head first, then every head up to the root
        (Person("emp", "sales-north"), ["nora", "sam", "ceo"]),
        # a department without a head is skipped, the next head up supervises
        (Person("emp", "north-field"), ["nora", "sam", "ceo"]),
        (Person("emp", "it"), ["ceo"]),
        (Person("emp", "it-ops"), ["olga", "ceo"]),
        # the head of a department is supervised by the parent's head, not by themself
        (Person("nora", "sales-north"), ["sam", "ceo"]),
        (Person("olga", "it-ops"), ["ceo"]),
        (Person("sam", "sales"), ["ceo"]),
        # the same head on two levels appears once
        (Person("emp", "sales-south"), ["sam", "ceo"]),
        (Person("sam", "sales-south"), ["ceo"]),
        # the root's head has nobody above
        (Person("ceo", "company"), []),
        (Person("emp", "company"), ["ceo"]),
        # no department, or one that does not exist: no supervisors
        (Person("emp", None), []),
        (Person("emp", "no-such-department"), []),
    ],
)
def test_supervisors_nearest_first_without_the_person(person: Person, expected: list[str]) -> None:
    assert supervisors_of(person, TREE) == expected


def test_supervisors_in_a_cyclic_tree_are_finite_and_unique() -> None:
    assert supervisors_of(Person("emp", "d"), CYCLIC) == ["head-d", "head-a", "head-b", "head-c"]
    assert supervisors_of(Person("head-a", "a"), CYCLIC) == ["head-b", "head-c"]


def test_supervisor_lists_never_contain_duplicates_or_the_person() -> None:
    candidates = ["emp", "ceo", "sam", "nora", "olga"]
    for person_id, dept_id in itertools.product(candidates, [*TREE, None]):
        person = Person(person_id, dept_id)
        heads = supervisors_of(person, TREE)
        assert person_id not in heads
        assert len(heads) == len(set(heads))


@pytest.mark.parametrize(
    ("candidate", "person", "expected"),
    [
        ("nora", Person("emp", "north-field"), True),
        ("sam", Person("emp", "north-field"), True),
        ("ceo", Person("emp", "north-field"), True),
        ("olga", Person("emp", "north-field"), False),
        ("nora", Person("nora", "sales-north"), False),
        ("sam", Person("nora", "sales-north"), True),
        ("nora", Person("sam", "sales"), False),  # a subordinate does not supervise upwards
        ("ceo", Person("ceo", "company"), False),
        ("ceo", Person("emp", None), False),
    ],
)
def test_is_supervisor(candidate: str, person: Person, expected: bool) -> None:
    assert is_supervisor(candidate, person, TREE) is expected


ALICE = Person("alice", "sales")
BOB = Person("bob", "it")
GONE = Person("gone", "sales", is_active=False)
EXT = Person("ext", None, is_external=True)
EXT2 = Person("ext2", None, is_external=True)
GONE_EXT = Person("gone-ext", None, is_external=True, is_active=False)


@pytest.mark.parametrize(
    ("viewer", "other", "shared", "expected"),
    [
        # employees see every active colleague, in any department
        (ALICE, BOB, [], True),
        (BOB, ALICE, [], True),
        (ALICE, BOB, ["wg1"], True),
        # ...but not inactive ones
        (ALICE, GONE, [], False),
        (ALICE, GONE, ["wg1"], False),
        # an extranet user sees only members of a shared workgroup
        (EXT, ALICE, [], False),
        (EXT, ALICE, ["wg1"], True),
        (EXT, EXT2, [], False),
        (EXT, EXT2, ["wg1", "wg2"], True),
        # and an employee sees an extranet user only through a shared workgroup
        (ALICE, EXT, [], False),
        (ALICE, EXT, ["wg1"], True),
        # a shared workgroup does not make an inactive user visible
        (EXT, GONE, ["wg1"], False),
        (ALICE, GONE_EXT, ["wg1"], False),
        # everyone sees themselves, even extranet users without groups
        (ALICE, ALICE, [], True),
        (EXT, EXT, [], True),
        (GONE, GONE, [], True),
    ],
)
def test_may_see_user(viewer: Person, other: Person, shared: list[str], expected: bool) -> None:
    assert may_see_user(viewer, other, shared) is expected


def test_may_see_user_accepts_any_iterable_of_workgroup_ids() -> None:
    assert may_see_user(EXT, ALICE, iter(["wg1"])) is True
    assert may_see_user(EXT, ALICE, iter([])) is False
    assert may_see_user(EXT, ALICE, (g for g in ["wg1"])) is True
    assert may_see_user(ALICE, EXT, set()) is False


def test_visibility_is_symmetric_between_active_users() -> None:
    people = [ALICE, BOB, EXT, EXT2]
    for viewer, other in itertools.product(people, people):
        for shared in ([], ["wg"]):
            assert may_see_user(viewer, other, shared) == may_see_user(other, viewer, shared), (
                viewer.id,
                other.id,
                shared,
            )


def test_search_words_are_distinct_and_few() -> None:
    assert search_words("  chief   it  chief ") == ["chief", "it"]
    assert search_words("") == []
    assert len(search_words(" ".join(f"w{n}" for n in range(20)))) == MAX_SEARCH_WORDS


def test_a_phone_number_with_punctuation_is_searched_as_one_run_of_digits() -> None:
    assert phone_search("+49 (30) 1234-567") == "49301234567"
    assert phone_search("0100 105") == "0100105"
    assert phone_search(" 12 ") == "12"
    assert phone_search("7") is None  # one digit finds everyone
    assert phone_search("sales 12") is None  # words: each is looked for on its own
    assert phone_search("") is None


def test_departments_are_found_by_part_of_their_name() -> None:
    names = {"d1": "Sales Europe", "d2": "IT", "d3": "Presales"}
    assert departments_named("SALES", names) == ["d1", "d3"]
    assert departments_named("it", names) == ["d2"]
    assert departments_named("finance", names) == []

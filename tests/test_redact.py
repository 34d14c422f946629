"""The streaming redactor: decided text only, never a prefix of a secret, same as whole-text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.capabilities.redact import MASK, StreamRedactor, redactText


def feedAll(redactor: StreamRedactor, pieces: list[str]) -> list[str]:
    """The redacted stream as it stood after each piece, then after the end."""
    seen = []
    stream = ""
    for piece in pieces:
        stream += redactor.feed(piece)
        seen.append(stream)
    stream += redactor.finish()
    seen.append(stream)
    return seen


def cut(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(max(point, 0), len(text)) for point in cuts})
    pieces, last = [], 0
    for point in [*points, len(text)]:
        pieces.append(text[last:point])
        last = point
    return pieces


class WholeTextTests(SynchronousTestCase):
    def test_replacesEveryOccurrence(self) -> None:
        self.assertEqual(redactText("a=hunter2 b=hunter2", ["hunter2"]), f"a={MASK} b={MASK}")

    def test_longestSecretWinsAtTheSamePosition(self) -> None:
        self.assertEqual(redactText("xabcdx", ["ab", "abcd"]), f"x{MASK}x")

    def test_emptySecretsAreIgnored(self) -> None:
        self.assertEqual(redactText("text", ["", ""]), "text")


class StreamTests(SynchronousTestCase):
    def test_secretInTwoPiecesIsNeverShownInPart(self) -> None:
        redactor = StreamRedactor(["s3cr3tvalue"])
        self.assertEqual(redactor.feed("token: s3cr"), "token: ")
        self.assertEqual(redactor.held, 4)
        self.assertEqual(redactor.feed("3tvalue!\n"), f"{MASK}!\n")
        self.assertEqual(redactor.finish(), "")

    def test_heldTextIsReleasedWhenItStopsLookingLikeASecret(self) -> None:
        redactor = StreamRedactor(["s3cr3t"])
        self.assertEqual(redactor.feed("s3c"), "")
        self.assertEqual(redactor.feed("ret"), "s3cret")

    def test_endOfStreamDecidesHeldText(self) -> None:
        redactor = StreamRedactor(["s3cr3t"])
        self.assertEqual(redactor.feed("abc s3cr"), "abc ")
        self.assertEqual(redactor.finish(), "s3cr")

    def test_shortSecretMatchWaitsForAPossibleLongerOne(self) -> None:
        redactor = StreamRedactor(["ab", "abcd"])
        self.assertEqual(redactor.feed("xab"), "x")
        self.assertEqual(redactor.feed("c"), "")
        self.assertEqual(redactor.feed("z"), f"{MASK}cz")

    def test_matchSwallowingAPossibleStartIsTaken(self) -> None:
        redactor = StreamRedactor(["abc", "cde"])
        self.assertEqual(redactor.feed("xabc"), f"x{MASK}")
        self.assertEqual(redactor.feed("de"), "de")

    def test_withoutSecretsTextPassesThrough(self) -> None:
        redactor = StreamRedactor([])
        self.assertEqual(redactor.feed("anything"), "anything")
        self.assertEqual(redactor.held, 0)

    def test_holdsAtMostTheLongestSecretLessOne(self) -> None:
        redactor = StreamRedactor(["0123456789"])
        redactor.feed("x" * 1000 + "012345678")
        self.assertEqual(redactor.held, 9)

    @settings(max_examples=400, deadline=None)
    @given(
        text=st.text(alphabet="abc", max_size=60),
        secrets=st.lists(st.text(alphabet="abc", min_size=1, max_size=5), max_size=4),
        cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=12),
    )
    def test_anyCuttingGivesTheWholeTextResultAndOnlyGrows(
        self, text: str, secrets: list[str], cuts: list[int]
    ) -> None:
        final = redactText(text, secrets)
        seen = feedAll(StreamRedactor(secrets), cut(text, cuts))
        self.assertEqual(seen[-1], final)
        for partial in seen:
            # Everything handed out is final: a prefix of the finished redacted stream.
            self.assertTrue(final.startswith(partial), (partial, final))

    @settings(max_examples=200, deadline=None)
    @given(
        before=st.text(alphabet="xyz ", max_size=20),
        secret=st.text(alphabet="abc", min_size=2, max_size=8),
        split=st.integers(min_value=1, max_value=7),
    )
    def test_noPrefixOfASecretIsEverHandedOut(self, before: str, secret: str, split: int) -> None:
        split = min(split, len(secret) - 1)
        redactor = StreamRedactor([secret])
        shown = redactor.feed(before + secret[:split])
        # Whatever the rest turns out to be, the piece of the secret is not shown yet.
        self.assertEqual(shown, before)
        self.assertEqual(redactor.feed(secret[split:]), MASK)

"""The streaming redactor: decided text only, never a prefix of a secret, same as whole-text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.capabilities.shells.redact import MASK, StreamRedactor, redactText


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
        """Every occurrence of a secret in a whole text is masked."""
        self.assertEqual(redactText("a=hunter2 b=hunter2", ["hunter2"]), f"a={MASK} b={MASK}")

    def test_longestSecretWinsAtTheSamePosition(self) -> None:
        """Where two secrets start at the same place, the longer one is masked."""
        self.assertEqual(redactText("xabcdx", ["ab", "abcd"]), f"x{MASK}x")

    def test_emptySecretsAreIgnored(self) -> None:
        """Empty secrets mask nothing."""
        self.assertEqual(redactText("text", ["", ""]), "text")


class StreamTests(SynchronousTestCase):
    def test_secretInTwoPiecesIsNeverShownInPart(self) -> None:
        """A secret arriving in two pieces is held back, then masked whole."""
        redactor = StreamRedactor(["s3cr3tvalue"])
        self.assertEqual(redactor.feed("token: s3cr"), "token: ")
        self.assertEqual(redactor.held, 4)
        self.assertEqual(redactor.feed("3tvalue!\n"), f"{MASK}!\n")
        self.assertEqual(redactor.finish(), "")

    def test_heldTextIsReleasedWhenItStopsLookingLikeASecret(self) -> None:
        """Held text is released as soon as it can no longer be a secret."""
        redactor = StreamRedactor(["s3cr3t"])
        self.assertEqual(redactor.feed("s3c"), "")
        self.assertEqual(redactor.feed("ret"), "s3cret")

    def test_endOfStreamDecidesHeldText(self) -> None:
        """The end of the stream releases a held prefix that never became a secret."""
        redactor = StreamRedactor(["s3cr3t"])
        self.assertEqual(redactor.feed("abc s3cr"), "abc ")
        self.assertEqual(redactor.finish(), "s3cr")

    def test_shortSecretMatchWaitsForAPossibleLongerOne(self) -> None:
        """A short secret's match waits while a longer one could still match there."""
        redactor = StreamRedactor(["ab", "abcd"])
        self.assertEqual(redactor.feed("xab"), "x")
        self.assertEqual(redactor.feed("c"), "")
        self.assertEqual(redactor.feed("z"), f"{MASK}cz")

    def test_matchSwallowingAPossibleStartIsTaken(self) -> None:
        """A match that covers a possible start of another secret is taken."""
        redactor = StreamRedactor(["abc", "cde"])
        self.assertEqual(redactor.feed("xabc"), f"x{MASK}")
        self.assertEqual(redactor.feed("de"), "de")

    def test_withoutSecretsTextPassesThrough(self) -> None:
        """Without secrets, text passes through unchanged and nothing is held."""
        redactor = StreamRedactor([])
        self.assertEqual(redactor.feed("anything"), "anything")
        self.assertEqual(redactor.held, 0)

    def test_holdsAtMostTheLongestSecretLessOne(self) -> None:
        """At most the longest secret's length less one character is held back."""
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
        """However a text is cut, the stream converges to the whole-text result and only
        ever grows."""
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
        """No proper prefix of a secret is ever handed out."""
        split = min(split, len(secret) - 1)
        redactor = StreamRedactor([secret])
        shown = redactor.feed(before + secret[:split])
        # Whatever the rest turns out to be, the piece of the secret is not shown yet.
        self.assertEqual(shown, before)
        self.assertEqual(redactor.feed(secret[split:]), MASK)


class LineBreakTests(SynchronousTestCase):
    """Line breaks inside a secret match any line break of a terminal's output."""

    def test_pemKeyShownWithCarriageReturnsIsMasked(self) -> None:
        """A key with ``\\n`` breaks, shown by a terminal as ``\\r\\n``, is masked whole."""
        key = "-----BEGIN KEY-----\nAAAA\nBBBB\n-----END KEY-----\n"
        shown = key.replace("\n", "\r\n")
        self.assertEqual(redactText(f"$ cat k\r\n{shown}$ ", [key]), f"$ cat k\r\n{MASK}$ ")

    def test_everyBreakFormMatches(self) -> None:
        """``\\n``, ``\\r\\n``, ``\\r\\r\\n`` (a CRLF secret through ONLCR) and a bare
        ``\\r`` all match a break of the secret, whichever form the secret uses."""
        for secret in ("ab\ncd", "ab\r\ncd", "ab\rcd"):
            for shown in ("ab\ncd", "ab\r\ncd", "ab\r\r\ncd", "ab\rcd"):
                self.assertEqual(redactText(f"<{shown}>", [secret]), f"<{MASK}>", (secret, shown))
        self.assertEqual(redactText("ab\n\ncd", ["ab\ncd"]), "ab\n\ncd")

    def test_breakAtTheEndOfAPieceIsHeldUntilDecided(self) -> None:
        """A secret ending in a break: a ``\\r`` at the end of a piece may still become
        ``\\r\\n``, so it is held (neither shown nor masked) until the next piece decides."""
        redactor = StreamRedactor(["key\n"])
        self.assertEqual(redactor.feed("a key\r"), "a ")
        self.assertEqual(redactor.feed("\nb"), f"{MASK}b")
        self.assertEqual(redactor.finish(), "")

    def test_breakSplitBetweenPiecesIsNeverShownInPart(self) -> None:
        """A multi-line secret arriving a character at a time is never shown in part."""
        secret = "one\ntwo\nthree"
        shown = "x " + secret.replace("\n", "\r\n") + " y"
        redactor = StreamRedactor([secret])
        out = "".join(redactor.feed(char) for char in shown) + redactor.finish()
        self.assertEqual(out, f"x {MASK} y")

    @settings(max_examples=400, deadline=None)
    @given(
        text=st.text(alphabet="ab\r\n", max_size=40),
        secrets=st.lists(st.text(alphabet="ab\r\n", min_size=1, max_size=5), max_size=3),
        cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
    )
    def test_anyCuttingWithBreaksGivesTheWholeTextResult(
        self, text: str, secrets: list[str], cuts: list[int]
    ) -> None:
        """With line breaks in texts and secrets, any cutting converges to the whole-text
        result and only ever grows."""
        final = redactText(text, secrets)
        seen = feedAll(StreamRedactor(secrets), cut(text, cuts))
        self.assertEqual(seen[-1], final)
        for partial in seen:
            self.assertTrue(final.startswith(partial), (partial, final))

"""Issue 8: harnesses that attack the real server and check that it holds (SigV4, accounts, crashes,
fuzzing, hostile artifacts and apps, endpoint abuse, load). The long versions live in bench/."""

"""One repository per aggregate. Each takes the connection of the transaction it works in."""

"""Member cards at the till: points from the POS's own receipts (issue 15).

rule.py (a card's bonus rule, no I/O), ledger.py (the write-ahead credit table in the journal's
file), credit.py (one credit, exactly once against card/membercard/updateuser), service.py (a
member scanned on a lane, tied to that lane's next receipt from the tap).
"""

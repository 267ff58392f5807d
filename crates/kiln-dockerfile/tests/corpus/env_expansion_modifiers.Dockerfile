FROM a
ENV A=${V#va} B=${V%ue} C=${V/val/VAL} D=${V:+set}

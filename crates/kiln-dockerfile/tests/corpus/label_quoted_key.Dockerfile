FROM a
LABEL "com.example.vendor"="ACME Inc"

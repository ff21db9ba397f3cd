//! Money: an integer number of minor units of one ISO 4217 currency. Arithmetic is
//! checked (overflow is an error, never a wrap) and never mixes currencies. There is no
//! floating point anywhere near money.

use std::fmt;

/// The currency used when a request names none.
pub const DEFAULT_CURRENCY: &str = "BRL";

/// Why a money value or operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not an ISO 4217 code of a currency with minor units (e.g. "XAU" has none).
    #[error("unknown currency code {0:?}: expected an ISO 4217 code such as BRL or USD")]
    UnknownCurrency(String),
    /// Two amounts of different currencies were combined.
    #[error("currency mismatch: {0} and {1}")]
    CurrencyMismatch(&'static str, &'static str),
    /// The result does not fit in 64 bits.
    #[error("amount overflow")]
    Overflow,
    /// An amount that must be positive was not.
    #[error("amount must be greater than zero")]
    NotPositive,
    /// An amount above the configured maximum.
    #[error("amount must be at most {0} minor units")]
    AboveMaximum(i64),
}

/// An ISO 4217 currency that has minor units, with its exponent (2 for BRL, 0 for JPY).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: iso_currency::Currency,
    exponent: u8,
}

impl Currency {
    /// Parses an ISO 4217 alphabetic code (upper case, as the standard writes it).
    pub fn parse(code: &str) -> Result<Self, MoneyError> {
        let unknown = || MoneyError::UnknownCurrency(code.to_owned());
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(unknown());
        }
        let currency = iso_currency::Currency::from_code(code).ok_or_else(unknown)?;
        let exponent = currency.exponent().ok_or_else(unknown)?;
        Ok(Self {
            code: currency,
            exponent: u8::try_from(exponent).map_err(|_| unknown())?,
        })
    }

    /// The alphabetic code, e.g. `BRL`.
    pub fn code(&self) -> &'static str {
        self.code.code()
    }

    /// Digits after the decimal point: 100 minor units of BRL are one real.
    pub fn exponent(&self) -> u8 {
        self.exponent
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An amount of one currency in minor units; may be negative (balances of system accounts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

impl Money {
    /// Any amount, e.g. a balance.
    pub fn new(amount_minor: i64, currency: Currency) -> Self {
        Self {
            amount_minor,
            currency,
        }
    }

    /// An amount a caller asks to move: greater than zero and at most `maximum`.
    pub fn positive(
        amount_minor: i64,
        currency: Currency,
        maximum: i64,
    ) -> Result<Self, MoneyError> {
        if amount_minor <= 0 {
            return Err(MoneyError::NotPositive);
        }
        if amount_minor > maximum {
            return Err(MoneyError::AboveMaximum(maximum));
        }
        Ok(Self::new(amount_minor, currency))
    }

    /// Zero of `currency`.
    pub fn zero(currency: Currency) -> Self {
        Self::new(0, currency)
    }

    /// The amount in minor units.
    pub fn amount_minor(&self) -> i64 {
        self.amount_minor
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// `self + other`, refusing other currencies and overflow.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let sum = self
            .amount_minor
            .checked_add(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Self::new(sum, self.currency))
    }

    /// `self - other`, refusing other currencies and overflow.
    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let difference = self
            .amount_minor
            .checked_sub(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Self::new(difference, self.currency))
    }

    /// `-self`, refusing overflow (`i64::MIN` has no negation).
    pub fn checked_neg(self) -> Result<Money, MoneyError> {
        let negated = self
            .amount_minor
            .checked_neg()
            .ok_or(MoneyError::Overflow)?;
        Ok(Self::new(negated, self.currency))
    }

    fn same_currency(&self, other: Money) -> Result<(), MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(
                self.currency.code(),
                other.currency.code(),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Money {
    /// `12.34 BRL`, `500 JPY` — for operators; exact, from integers only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exponent = u32::from(self.currency.exponent);
        let sign = if self.amount_minor < 0 { "-" } else { "" };
        let magnitude = self.amount_minor.unsigned_abs();
        if exponent == 0 {
            return write!(f, "{sign}{magnitude} {}", self.currency);
        }
        let scale = 10u64.pow(exponent);
        write!(
            f,
            "{sign}{}.{:0width$} {}",
            magnitude / scale,
            magnitude % scale,
            self.currency,
            width = exponent as usize
        )
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn currency(code: &str) -> Currency {
        match Currency::parse(code) {
            Ok(currency) => currency,
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn currencies_are_iso_4217_codes_with_their_exponents() {
        assert_eq!(currency("BRL").exponent(), 2);
        assert_eq!(currency("JPY").exponent(), 0);
        assert_eq!(currency("KWD").exponent(), 3);
        for bad in ["", "brl", "BR", "BRLL", "XXX", "XAU", "ZZZ", "B1L"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn display_is_exact() {
        assert_eq!(Money::new(1234, currency("BRL")).to_string(), "12.34 BRL");
        assert_eq!(Money::new(-5, currency("USD")).to_string(), "-0.05 USD");
        assert_eq!(Money::new(500, currency("JPY")).to_string(), "500 JPY");
        assert_eq!(Money::new(1, currency("KWD")).to_string(), "0.001 KWD");
    }

    #[test]
    fn requested_amounts_are_positive_and_bounded() {
        let brl = currency("BRL");
        assert_eq!(Money::positive(0, brl, 100), Err(MoneyError::NotPositive));
        assert_eq!(Money::positive(-1, brl, 100), Err(MoneyError::NotPositive));
        assert_eq!(
            Money::positive(101, brl, 100),
            Err(MoneyError::AboveMaximum(100))
        );
        assert_eq!(
            Money::positive(100, brl, 100).map(|m| m.amount_minor()),
            Ok(100)
        );
    }

    proptest! {
        /// Checked arithmetic agrees with exact (128-bit) arithmetic, or reports overflow
        /// exactly when the exact result leaves 64 bits.
        #[test]
        fn arithmetic_matches_an_exact_model(a in any::<i64>(), b in any::<i64>()) {
            let brl = currency("BRL");
            let (x, y) = (Money::new(a, brl), Money::new(b, brl));
            let exact_sum = i128::from(a) + i128::from(b);
            match x.checked_add(y) {
                Ok(sum) => prop_assert_eq!(i128::from(sum.amount_minor()), exact_sum),
                Err(err) => {
                    prop_assert_eq!(err, MoneyError::Overflow);
                    prop_assert!(i64::try_from(exact_sum).is_err());
                }
            }
            let exact_difference = i128::from(a) - i128::from(b);
            match x.checked_sub(y) {
                Ok(difference) => prop_assert_eq!(i128::from(difference.amount_minor()), exact_difference),
                Err(err) => {
                    prop_assert_eq!(err, MoneyError::Overflow);
                    prop_assert!(i64::try_from(exact_difference).is_err());
                }
            }
        }

        /// Adding then subtracting the same amount gives back the original.
        #[test]
        fn add_then_sub_round_trips(a in -1_000_000_000_000i64..1_000_000_000_000, b in -1_000_000_000_000i64..1_000_000_000_000) {
            let usd = currency("USD");
            let round_trip = Money::new(a, usd).checked_add(Money::new(b, usd)).and_then(|s| s.checked_sub(Money::new(b, usd)));
            prop_assert_eq!(round_trip, Ok(Money::new(a, usd)));
        }

        /// Currencies never mix, whatever the amounts.
        #[test]
        fn currencies_never_mix(a in any::<i64>(), b in any::<i64>()) {
            let (brl, usd) = (currency("BRL"), currency("USD"));
            prop_assert_eq!(Money::new(a, brl).checked_add(Money::new(b, usd)), Err(MoneyError::CurrencyMismatch("BRL", "USD")));
            prop_assert_eq!(Money::new(a, brl).checked_sub(Money::new(b, usd)), Err(MoneyError::CurrencyMismatch("BRL", "USD")));
        }
    }
}
